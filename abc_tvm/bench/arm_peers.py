"""Peers of the ARM cycle model, and its calibration against published board figures.

ncnn's own benchmark ResNet-18 (fp32 and int8, `benchmarks/ncnn/`) has published single-
thread times on a Raspberry Pi 4 and 5; run through the same cycle model as abc-tvm's
bundles (`cycle_model.process_estimate`: every block of the whole process costed), model ÷
published says how far the model is from a board, and its inverse is the calibration factor
the bench prints beside (never instead of) the raw figure. ONNX Runtime on the same network
(converted from ncnn's param file) is the float row a user compares with.

The peers run in an aarch64 CPython 3.11 with their PyPI wheels, unpacked from Debian's
arm64 packages into a sysroot (`make arm-peers`, or `python -m abc_tvm.bench.arm_peers
build`) and started as `qemu-aarch64 -L <sysroot>`; the host's Python is not touched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abc_tvm.bench import cycle_model as cm
from abc_tvm.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SYSROOT = ROOT / "out" / "arm-sysroot"
NCNN_DIR = ROOT / "benchmarks" / "ncnn"
LOOP = Path(__file__).resolve().with_name("arm_peer_loop.py")

# Debian bookworm's arm64 packages an aarch64 CPython 3.11 and the wheels' C++ runtime need
DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6",
        "libstdc++6", "libgcc-s1", "libgomp1", "zlib1g", "libexpat1", "libffi8")
# ncnn 1.0.20230517 is the release before the published Pi 4 run (2023-06-15); under the
# model 1.0.20250503 gives the same ResNet-18 figures within 0.1% on both cores
# (installed without their declared dependencies: ncnn's pull in OpenCV, which inference
# does not import; ONNX Runtime's are listed). onnxruntime 1.32.0 segfaults while importing
# under Debian's qemu 7.2; 1.19.2 runs
# ai-edge-litert (LiteRT, XNNPACK inside) and what its interpreter imports
WHEELS = ("ncnn==1.0.20230517", "onnxruntime==1.19.2", "numpy==2.4.6", "flatbuffers==25.12.19",
          "packaging==26.4", "protobuf==7.36.2", "ai-edge-litert==2.3.0",
          "backports.strenum==1.2.8", "tqdm==4.70.1", "typing-extensions==4.16.0",
          "ml_dtypes==0.7.0")
# The LiteRT rows' models: a Keras ResNet-18 converted by TFLiteConverter, fp32 and int8
# (`make litert-models`, which needs the TensorFlow environment of `make larq-zoo`)
LITERT_DIR = ROOT / "out" / "litert"
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64")


@dataclass(frozen=True)
class Published:
    """A peer's published single-thread time on a board, and where it is written."""

    ms: float
    source: str


# Tencent/ncnn benchmark/README.md, `benchncnn 10 1 0 -1 1` (Pi 4, commit cc37c10, 2023-06-15)
# and `benchncnn 10 1 0 -1 -1` (Pi 5, commit 070dac9, 2023-12-12), resnet18 / resnet18_int8 avg
_PI4 = "ncnn benchmark/README.md, Raspberry Pi 4 Model B (Cortex-A72 1.8 GHz), 1 thread"
_PI5 = "ncnn benchmark/README.md, Raspberry Pi 5 (Cortex-A76 2.4 GHz), 1 thread"
PUBLISHED = {
    ("rpi4", "ncnn-fp32"): Published(191.10, _PI4),
    ("rpi4", "ncnn-int8"): Published(158.50, _PI4),
    ("rpi5", "ncnn-fp32"): Published(29.68, _PI5),
    ("rpi5", "ncnn-int8"): Published(36.42, _PI5),
}
PUBLISHED[("arm", "ncnn-fp32")] = PUBLISHED[("rpi4", "ncnn-fp32")]
PUBLISHED[("arm", "ncnn-int8")] = PUBLISHED[("rpi4", "ncnn-int8")]

# Calibration factor per core: published ÷ modelled ncnn ResNet-18 fp32 (raw model, compute
# only), as recorded in docs/benchmarks.md by `abc-tvm bench --cycle-model --target T --peers`
# (which prints the factor it measures; update these from it).
CALIBRATION = {"rpi4": 191.10 / 117.27, "rpi5": 29.68 / 27.76}
CALIBRATION["arm"] = CALIBRATION["rpi4"]

PEERS = ("ncnn-fp32", "ncnn-int8", "ort-fp32", "litert-fp32", "litert-int8")


# -- the sysroot ----------------------------------------------------------------------------

def python_of(sysroot: Path) -> Path:
    return sysroot / "usr" / "bin" / "python3.11"


def site_of(sysroot: Path) -> Path:
    return sysroot / "site"


def have_sysroot(sysroot: Path = SYSROOT) -> bool:
    return python_of(sysroot).is_file() and (site_of(sysroot) / "ncnn").is_dir()


def missing_message(sysroot: Path = SYSROOT) -> str:
    return (f"the peers' aarch64 sysroot {sysroot} is missing: `make arm-peers` builds it "
            "(Debian arm64 packages of CPython 3.11 and the ncnn / onnxruntime wheels)")


def build(sysroot: Path = SYSROOT) -> Path:
    """Unpack Debian's arm64 CPython 3.11 (and the C/C++ runtime) into `sysroot` and install
    the peers' aarch64 wheels into `sysroot/site`. Needs `dpkg --add-architecture arm64` and
    `apt-get update` done once (the Makefile target does both)."""
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise UserError("building the peers' sysroot needs Debian's apt-get and dpkg-deb")
    if site_of(sysroot).exists():  # a rebuild installs exactly WHEELS
        shutil.rmtree(site_of(sysroot))
    sysroot.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([apt, "download", *(f"{p}:arm64" for p in DEBS)], cwd=tmp,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError("apt-get download of the arm64 packages failed (is arm64 added: "
                            "`dpkg --add-architecture arm64 && apt-get update`?): "
                            + proc.stderr.strip().splitlines()[-1])
        debs = sorted(Path(tmp).glob("*.deb"))
        for deb in debs:
            subprocess.run([dpkg, "-x", str(deb), str(sysroot)], check=True)
        names = [d.name for d in debs]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target",
                    str(site_of(sysroot)), *plat, "--python-version", "3.11",
                    "--only-binary=:all:", "--no-deps", *WHEELS], check=True)
    (sysroot / "abc-tvm-sysroot.json").write_text(json.dumps({"debs": names,
                                                              "wheels": list(WHEELS)}, indent=1))
    return sysroot


# /proc/cpuinfo of the modelled core (MIDR part, the kernel's feature names for its HWCAPs).
# qemu 7.2's linux-user passes the host's x86 /proc/cpuinfo through; the cpuinfo library
# inside XNNPACK (LiteRT) and recent ONNX Runtimes crashes parsing it (signal 11 when the
# interpreter is made). qemu's -L prefix serves SYSROOT/proc/cpuinfo in its place.
CPUINFO = {"cortex-a72": ("0xd08", "fp asimd evtstrm crc32 cpuid"),
           "cortex-a76": ("0xd0b", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
                                   "asimdhp cpuid asimdrdm lrcpc dcpop asimddp")}


def write_cpuinfo(sysroot: Path, target: str) -> Path:
    """The sysroot's /proc/cpuinfo for the board `target` names, one core, and the sysfs
    CPU lists to match (cpuinfo indexes the cores /sys lists into those /proc/cpuinfo
    describes: ONNX Runtime aborts when the host's two cores meet one described)."""
    part, features = CPUINFO[cm.core_of(target).qemu_cpu]
    cpus = sysroot / "sys" / "devices" / "system" / "cpu"
    cpus.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpus / name).write_text("0\n")
    path = sysroot / "proc" / "cpuinfo"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
                    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
                    f"CPU part\t: {part}\nCPU revision\t: 3\n\n")
    return path


def qemu_for(sysroot: Path) -> list[str]:
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        raise UserError("the peers run under qemu-aarch64 (apt-get install qemu-user)")
    return [qemu, "-L", str(sysroot)]


# -- ncnn's network as ONNX (for ONNX Runtime) -------------------------------------------------

def _kv(fields: list[str]) -> dict[int, str]:
    out = {}
    for f in fields:
        k, _, v = f.partition("=")
        if k.lstrip("-").isdigit():
            out[int(k)] = v
    return out


def onnx_of_param(param: Path, out: Path, size: int = 224, seed: int = 0) -> Path:
    """ncnn's benchmark ResNet-18 param file as an ONNX graph with random weights, so that
    ONNX Runtime runs the same network as ncnn (Caffe's ResNet-18: a projection shortcut in
    every stage's first block, ceil-mode max pooling)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, shapes = [], [], {}
    alias: dict[str, str] = {}
    lines = param.read_text().splitlines()[2:]
    for line in lines:
        f = line.split()
        kind, name, n_in, n_out = f[0], f[1], int(f[2]), int(f[3])
        ins = [alias.get(b, b) for b in f[4:4 + n_in]]
        outs = f[4 + n_in:4 + n_in + n_out]
        kv = _kv(f[4 + n_in + n_out:])
        if kind == "Input":
            shapes[outs[0]] = (int(kv[2]), int(kv[1]), int(kv[0]))
            continue
        if kind == "Split":
            for o in outs:
                alias[o] = ins[0]
            continue
        y = outs[0]
        if kind == "Convolution":
            c = shapes[ins[0]][0]
            o, k, s = int(kv[0]), int(kv[1]), int(kv.get(3, 1))
            p = int(kv.get(4, 0))
            w = rng.standard_normal((o, c, k, k), dtype=np.float32) \
                * np.float32(np.sqrt(2 / (c * k * k)))
            inits += [numpy_helper.from_array(w, f"{name}_w"),
                      numpy_helper.from_array(np.zeros(o, np.float32), f"{name}_b")]
            conv = y if kv.get(9, "0") == "0" else f"{name}_pre"
            nodes.append(helper.make_node("Conv", [ins[0], f"{name}_w", f"{name}_b"], [conv],
                                          kernel_shape=[k, k], strides=[s, s], pads=[p] * 4))
            if conv != y:
                nodes.append(helper.make_node("Relu", [conv], [y]))
            h, wd = shapes[ins[0]][1:]
            shapes[y] = (o, (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1)
        elif kind == "Pooling":
            c, h, wd = shapes[ins[0]]
            if kv.get(4, "0") == "1":
                nodes.append(helper.make_node("GlobalAveragePool", ins, [y]))
                shapes[y] = (c, 1, 1)
            else:
                k, s = int(kv.get(1, 1)), int(kv.get(2, 1))
                nodes.append(helper.make_node("MaxPool", ins, [y], kernel_shape=[k, k],
                                              strides=[s, s], ceil_mode=1))
                shapes[y] = (c, -(-(h - k) // s) + 1, -(-(wd - k) // s) + 1)
        elif kind == "Eltwise":
            nodes.append(helper.make_node("Add", ins, [y]))
            shapes[y] = shapes[ins[0]]
        elif kind == "ReLU":
            nodes.append(helper.make_node("Relu", ins, [y]))
            shapes[y] = shapes[ins[0]]
        elif kind == "InnerProduct":
            c = int(np.prod(shapes[ins[0]]))
            o = int(kv[0])
            w = rng.standard_normal((o, c), dtype=np.float32) / np.float32(np.sqrt(c))
            inits += [numpy_helper.from_array(w, f"{name}_w"),
                      numpy_helper.from_array(np.zeros(o, np.float32), f"{name}_b")]
            nodes.append(helper.make_node("Flatten", ins, [f"{name}_flat"]))
            nodes.append(helper.make_node("Gemm", [f"{name}_flat", f"{name}_w", f"{name}_b"],
                                          [y], transB=1))
            shapes[y] = (o,)
        elif kind == "Softmax":
            nodes.append(helper.make_node("Softmax", ins, [y], axis=1))
            shapes[y] = shapes[ins[0]]
        else:
            raise UserError(f"{param.name}: no ONNX for ncnn layer {kind}")
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])
    last = lines[-1].split()
    y = helper.make_tensor_value_info(last[4 + int(last[2])], TensorProto.FLOAT,
                                      [1, *shapes[alias.get(last[4], last[4])]])
    graph = helper.make_graph(nodes, param.stem, [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=8)  # what older ONNX Runtimes read
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


# -- the peers through the model --------------------------------------------------------------

def _argv(peer: str, sysroot: Path, work: Path) -> tuple[str, str]:
    if peer == "ncnn-fp32":
        return "ncnn", str(NCNN_DIR / "resnet18.param")
    if peer == "ncnn-int8":
        return "ncnn", str(NCNN_DIR / "resnet18_int8.param")
    if peer == "ort-fp32":
        onnx_path = work / "ncnn_resnet18_fp32.onnx"
        if not onnx_path.is_file():
            onnx_of_param(NCNN_DIR / "resnet18.param", onnx_path)
        return "ort", str(onnx_path)
    if peer in ("litert-fp32", "litert-int8"):
        model = LITERT_DIR / f"resnet18_{peer.removeprefix('litert-')}.tflite"
        if not model.is_file():
            raise UserError(f"{model} is missing: `make litert-models` writes it")
        return "litert", str(model)
    raise UserError(f"the ARM peers are {', '.join(PEERS)}, not {peer!r}")


def run_peer(peer: str, target: str, work: Path, sysroot: Path = SYSROOT,
             repeat: int = 2) -> dict:
    """One peer's ResNet-18 inference (1 thread, 224², batch 1) modelled on `target`."""
    if not have_sysroot(sysroot):
        raise UserError(missing_message(sysroot))
    engine, path = _argv(peer, sysroot, work)
    py = str(python_of(sysroot))

    def argv_for(n: int) -> list[str]:
        return [py, str(LOOP), engine, path, str(n)]

    env = {"PYTHONPATH": str(site_of(sysroot)), "PYTHONNOUSERSITE": "1"}
    write_cpuinfo(sysroot, target)
    est = cm.process_estimate(argv_for, target, qemu_for(sysroot), repeat, env)
    pub = PUBLISHED.get((target, peer))
    row = {"peer": peer, "target": target, **est.as_dict()}
    if pub is not None:
        row |= {"published_ms": pub.ms, "published_source": pub.source,
                "model_over_published": est.ms / pub.ms,
                "with_memory_over_published": (est.ms + est.memory_ms) / pub.ms}
    return row


def run(target: str, work: Path, peers: tuple[str, ...] = PEERS,
        sysroot: Path = SYSROOT) -> list[dict]:
    """Every peer on `target`; the rows and the calibration factor they give."""
    cm.core_of(target)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for peer in peers:
        if peer.startswith("litert-") and not (site_of(sysroot) / "ai_edge_litert").is_dir():
            print(f"  {peer} skipped: LiteRT is not in the sysroot (`make arm-peers` again)")
            continue
        try:
            row = run_peer(peer, target, work, sysroot)
        except UserError as e:
            if not peer.startswith("litert-"):
                raise
            print(f"  {peer} skipped: {e}", flush=True)
            continue
        rows.append(row)
        pub = f" (published {row['published_ms']:g} ms)" if "published_ms" in row else ""
        print(f"  {peer}: {row['ms']:.1f} ms modelled, +{row['memory_ms']:.1f} ms DRAM "
              f"traffic{pub}", flush=True)
    (work / f"arm_peers_{target}.json").write_text(json.dumps(rows, indent=1))
    return rows


def calibration(rows: list[dict], target: str) -> float:
    """published ÷ modelled ncnn fp32 from `rows` when they have it, else the recorded one."""
    for r in rows:
        if r["peer"] == "ncnn-fp32" and "published_ms" in r:
            return r["published_ms"] / r["ms"]
    return CALIBRATION[target]


def table(rows: list[dict], factor: float) -> str:
    out = ["| peer (ResNet-18, 1 thread, 224²) | modelled ms (raw) | × calibration | "
           "DRAM MB / inference | + DRAM at the model's bandwidth | published ms | "
           "model ÷ published | (model + DRAM) ÷ published |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pub = r.get("published_ms")
        ratio = "-" if pub is None else f"{r['model_over_published']:.2f}"
        ratio_m = "-" if pub is None else f"{r['with_memory_over_published']:.2f}"
        out.append(f"| {r['peer']} | **{r['ms']:.1f}** | {r['ms'] * factor:.1f} | "
                   f"{r['dram_bytes'] / 1e6:.0f} | {r['ms'] + r['memory_ms']:.1f} | "
                   f"{'-' if pub is None else f'{pub:g}'} | {ratio} | {ratio_m} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m abc_tvm.bench.arm_peers build|run`: make the sysroot, or model the peers."""
    p = argparse.ArgumentParser(prog="python -m abc_tvm.bench.arm_peers")
    p.add_argument("what", choices=("build", "run"))
    p.add_argument("--sysroot", type=Path, default=SYSROOT)
    p.add_argument("--target", default="rpi4")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--work-dir", type=Path, default=ROOT / "out" / "bench" / "cycle_model")
    a = p.parse_args(argv)
    try:
        if a.what == "build":
            print(f"built {build(a.sysroot)}")
        else:
            rows = run(a.target, a.work_dir, tuple(a.peers.split(",")), a.sysroot)
            print(table(rows, calibration(rows, a.target)))
    except (UserError, subprocess.CalledProcessError) as e:
        print(f"arm_peers: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
