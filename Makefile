# One entry point for a fresh machine: `make demo` and `make test` set everything up first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     := out

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  { echo "installing Debian's g++-aarch64-linux-gnu and qemu-user (for --target arm)"; \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq g++-aarch64-linux-gnu qemu-user; }
	$(PY) -m venv $(VENV)
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

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(OUT) .pytest_cache
