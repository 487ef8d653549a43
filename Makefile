# One entry point for a fresh machine: `make demo` and `make test` set everything up first.
# The newest Python >= 3.11 that runs, or the one PY= names (make test PY=python3.12). Each
# candidate is run, not looked up: a pyenv shim that refuses to run without a selected
# version is replaced by that version's own interpreter (`pyenv prefix 3.12`).
PY      ?=
PYTHON  := $(shell for c in $(if $(PY),$(PY),python3.13 python3.12 python3.11); do \
             if $$c -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; \
               then echo $$c; exit; fi; \
             v=$$(echo $$c | sed 's/.*python//'); p=$$(pyenv prefix $$v 2>/dev/null) \
               && $$p/bin/python$$v -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
               2>/dev/null && { echo $$p/bin/python$$v; exit; }; \
           done; echo none)
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     := out

.PHONY: setup demo test lint clean tuning-logs arm-peers larq-zoo litert-models fuzz soak

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null && \
	  command -v llvm-mca-19 >/dev/null || \
	  { echo "installing Debian's g++-aarch64-linux-gnu, qemu-user (for --target arm) and llvm-19 (llvm-mca for the ARM cycle model)"; \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq g++-aarch64-linux-gnu qemu-user llvm-19; }
	@[ "$(PYTHON)" != none ] || { echo "no Python 3.11+ found$(if $(PY), (PY=$(PY) does not run or is older than 3.11)): install one, or make ... PY=/path/to/python3.X"; exit 2; }
	@echo "using $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# Export the bundled CIFAR ABC-ResNet-20, compile it for this CPU, run it, compare with ORT.
demo: setup
	mkdir -p $(OUT)
	$(BIN)/abc-tvm zoo abc_resnet20 -M 3 -N 3 -o $(OUT)/abc_resnet20.onnx
	$(BIN)/python -m abc_tvm.demo $(OUT)

test: setup
	$(BIN)/python -m pytest -n 2 -q

# Regenerate the shipped MetaSchedule databases of ABC-ResNet-18 (224x224, batch 1) for
# this CPU, ABC kernels only (the float ops keep their hand-written schedule): about 2.5 s
# per trial on a 2-core EPYC, so TRIALS=200 takes ~8 min per model.
TRIALS ?= 200
tuning-logs: setup
	mkdir -p $(OUT)
	for mn in 1x1 3x3 5x5; do m=$${mn%x*}; n=$${mn#*x}; name=abc_resnet18_m$${m}n$${n}; \
	  $(BIN)/abc-tvm zoo abc_resnet18 -M $$m -N $$n -o $(OUT)/$$name.onnx && \
	  $(BIN)/abc-tvm tune $(OUT)/$$name.onnx --target x86 --trials $(TRIALS) --kernels abc \
	    --log tuning_logs/$${name}_$$($(BIN)/python -c 'from abc_tvm import targets as t; \
	      print(t.x86_level(t.cpu_features(t.host_target())))') || exit 1; done

# The ARM cycle model's peers (ncnn, ONNX Runtime) and its calibration against published
# Raspberry Pi figures: an aarch64 CPython 3.11 from Debian's arm64 packages, unpacked into
# $(OUT)/arm-sysroot (nothing is installed over this machine's), with the peers' aarch64
# wheels in $(OUT)/arm-sysroot/site; run under qemu-aarch64 -L. Then
# `abc-tvm bench --cycle-model --target rpi4|rpi5` adds the peer rows and the calibration.
arm-peers: setup
	@dpkg --print-foreign-architectures | grep -qx arm64 || \
	  { echo "adding Debian's arm64 architecture (for apt-get download of arm64 packages)"; \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO dpkg --add-architecture arm64 && $$SUDO apt-get update -qq; }
	$(BIN)/python -m abc_tvm.bench.arm_peers build --sysroot $(OUT)/arm-sysroot

# The Larq Zoo (11 models, random weights) exported by tf2onnx and compiled, each compared
# with ONNX Runtime (benchmarks/larq_zoo_check.py). TensorFlow 2.15 + Larq need Python 3.11
# with numpy 1.26 and protobuf 3.20, so they get their own environment, .venv-larq (about
# 1.4 GB, ~5 min to install); the export takes ~3 min and the check ~4 min on 2 cores.
PY311 ?= $(shell command -v python3.11 >/dev/null && python3.11 -c 'import sys' 2>/dev/null \
           && echo python3.11 || { p=$$(pyenv prefix 3.11 2>/dev/null) && echo $$p/bin/python3.11; })
LARQ_PY := .venv-larq/bin/python
$(LARQ_PY):
	@[ -n "$(PY311)" ] || { echo "TensorFlow 2.15 needs Python 3.11: make $(MAKECMDGOALS) PY311=/path/to/python3.11"; exit 2; }
	$(PY311) -m venv .venv-larq
	.venv-larq/bin/pip install -q "tensorflow-cpu==2.15.*" "larq==0.14.*" "larq-zoo==2.4.*" \
	  "tf2onnx==1.17.*" "numpy==1.26.*" "protobuf==3.20.*" onnx

larq-zoo: setup $(LARQ_PY)
	mkdir -p $(OUT)/larq
	TF_CPP_MIN_LOG_LEVEL=3 $(LARQ_PY) benchmarks/larq_zoo_check.py export --out $(OUT)/larq
	$(BIN)/python benchmarks/larq_zoo_check.py check $(OUT)/larq --json $(OUT)/larq/results.json

# ResNet-18 as TFLite (fp32 and int8) for the LiteRT rows of the ARM peers, converted by
# TensorFlow in the environment above, ~1 min.
litert-models: setup $(LARQ_PY)
	$(LARQ_PY) benchmarks/litert_resnet18.py --out $(OUT)/litert

# Reliability (docs/reliability.md): 1000 mutated models through inspect and compile
# (~15 min on 2 cores), and 10k requests at concurrency 16 with hostile clients (~1 min).
fuzz: setup
	mkdir -p $(OUT)/fuzz
	$(BIN)/python benchmarks/fuzz_front_door.py --cases 1000 --seed 1 --out $(OUT)/fuzz/fuzz.json --keep

soak: setup
	$(BIN)/python benchmarks/soak_server.py --requests 10000 --concurrency 16 --json $(OUT)/soak.json

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(OUT) .pytest_cache
