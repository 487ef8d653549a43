"""`abc-tvm bench --cycle-model --target rpi4|rpi5`: each bench model's bundle costed by the
ARM cycle model (`cycle_model`), as a table and a section of docs/benchmarks.md.

Models are exported and compiled with the CLI's own commands (`zoo`, `compile --bundle`),
cached in the work dir under the hash of the compiler's sources.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from abc_tvm.bench import arm_peers
from abc_tvm.bench import cycle_model as cm
from abc_tvm.bench.common import COMPILE_EXCLUDE, COMPILE_SOURCES, sources_hash
from abc_tvm.errors import UserError

DEFAULT_MODELS = ("abc_resnet18:1x1", "bireal18", "reactnet_a")
# The targets on the Pi 4 model (ms, 1 thread, 224², batch 1)
TARGETS_MS = {"abc_resnet18:1x1": 25.0, "bireal18": 40.0, "reactnet_a": 60.0}


def _zoo_args(model: str) -> list[str]:
    name, _, mn = model.partition(":")
    if name == "abc_resnet18":
        m, _, n = (mn or "1x1").partition("x")
        return [name, "-M", m, "-N", n]
    if name in ("bireal18", "reactnet_a"):
        return [name]
    raise UserError(f"the cycle model benches abc_resnet18[:MxN], bireal18, reactnet_a; "
                    f"not {model!r}")


def bundle_for(model: str, target: str, size: int, work: Path) -> Path:
    """The model's bundle for `target`, exported and compiled unless cached."""
    from abc_tvm import cli

    key = sources_hash(COMPILE_SOURCES, f"{model}/{target}/{size}", COMPILE_EXCLUDE)
    d = work / f"{model.replace(':', '_')}-{target}-{size}-{key}"
    bundle = d / "bundle"
    if (bundle / "run.sh").is_file():
        return bundle
    d.mkdir(parents=True, exist_ok=True)
    onnx_path = d / "model.onnx"
    for argv in (["zoo", *_zoo_args(model), "--image-size", str(size), "-o", str(onnx_path)],
                 ["compile", str(onnx_path), "--target", target, "--bundle", str(bundle)]):
        if cli.main(argv) != 0:
            raise UserError(f"abc-tvm {' '.join(argv[:2])} failed for {model}")
    return bundle


def run(models: list[str], target: str, size: int, work: Path) -> list[dict]:
    """Model every model on the board `target` names; one record each."""
    cm.core_of(target)
    found = []
    for model in models:
        t0 = time.time()
        bundle = bundle_for(model, target, size, work)
        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        est = cm.estimate(bundle, x, target)
        found.append({"model": model, "target": target, "size": size, **est.as_dict(),
                      "wall_s": time.time() - t0})
        print(f"  {model}: {est.ms:.1f} ms modelled on {est.core.board} "
              f"({time.time() - t0:.0f} s)", flush=True)
    peers, factor, how = peer_rows(target, work)
    for r in found:
        r["calibration"] = {"factor": factor, "how": how}
        r["calibrated_ms"] = r["ms"] * factor
    if found:
        found[0]["peers"] = peers
    (work / f"cycle_model_{target}.json").write_text(json.dumps(found, indent=1))
    return found


PEER_SOURCES = ["abc_tvm/bench/cycle_model.py", "abc_tvm/bench/arm_peers.py",
                "abc_tvm/bench/arm_peer_loop.py", "abc_tvm/deploy/block_counts.c",
                "abc_tvm/deploy/cache_misses.c", "benchmarks/ncnn/*.param"]


def peer_rows(target: str, work: Path) -> tuple[list[dict], float, str]:
    """The peers (ncnn, ONNX Runtime) through the same model when their sysroot exists
    (cached in the work dir under the hash of the model's sources), with the calibration
    factor they give; without the sysroot, the recorded factor and a line saying so."""
    if not arm_peers.have_sysroot():
        print(f"  peers skipped: {arm_peers.missing_message()}; the calibration printed is "
              "the recorded one", flush=True)
        return [], arm_peers.CALIBRATION[target], "recorded"
    stamp = arm_peers.SYSROOT / "abc-tvm-sysroot.json"
    key = sources_hash(PEER_SOURCES, target + (stamp.read_text() if stamp.is_file() else ""))
    cache = work / f"arm_peers_{target}-{key}.json"
    if cache.is_file():
        rows = json.loads(cache.read_text())
    else:
        print(f"  peers on the {cm.core_of(target).board} model (ncnn, ONNX Runtime; "
              "minutes):", flush=True)
        rows = arm_peers.run(target, work / "peers")
        cache.write_text(json.dumps(rows, indent=1))
    return rows, arm_peers.calibration(rows, target), "measured"


def _mcyc(c: float) -> str:
    return f"{c / 1e6:.1f}"


def bound_cycles(r: dict) -> float:
    """The model's own lower bound for a record: every binary kernel's bit-MACs at the
    AND/popcount peak plus every float conv's and dense's MACs at the FMA peak (glue,
    pooling and packing free). A target below it cannot be met under this model."""
    pk = r["peaks"]
    per = {"binary": pk["bitmacs_per_cycle"], "float-conv": pk["fmas_per_cycle"],
           "dense": pk["fmas_per_cycle"]}
    return sum(k["work"] / per[k["kind"]] for k in r["kernels"] if k["kind"] in per)


def verdict(r: dict) -> str:
    """The target's verdict, naming the model's bound when the target lies below it."""
    goal = TARGETS_MS.get(r["model"]) if r["target"] in ("rpi4", "arm") else None
    if goal is None:
        return "-"
    if r["ms"] <= goal:
        return f"≤ {goal:g} ms: met"
    bound_ms = bound_cycles(r) / (r["ghz"] * 1e6)
    if goal < bound_ms:
        return f"≤ {goal:g} ms: not met (below this model's bound)"
    return f"≤ {goal:g} ms: not met"


def table(found: list[dict]) -> str:
    """Whole models against the model's bound, then the time by kind of kernel."""
    out = ["| model | modelled ms | × calibration (ms) | bound ms | % of bound | M cycles "
           "| float conv | binary | glue + other | dense | outside | target |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        k = r["by_kind"]
        bound = bound_cycles(r)
        cal = r.get("calibrated_ms")
        out.append(f"| {r['model']} | **{r['ms']:.1f}** | "
                   f"{'-' if cal is None else f'{cal:.1f}'} | "
                   f"{bound / (r['ghz'] * 1e6):.1f} | {100 * bound / r['cycles']:.0f}% | "
                   f"{_mcyc(r['cycles'])} | "
                   f"{_mcyc(k.get('float-conv', 0))} | {_mcyc(k.get('binary', 0))} | "
                   f"{_mcyc(k.get('other', 0) + k.get('runtime', 0))} | "
                   f"{_mcyc(k.get('dense', 0))} | "
                   f"{_mcyc(k.get('outside the model (runtime, libc)', 0))} | {verdict(r)} |")
    return "\n".join(out)


def kernel_table(r: dict, top: int = 14) -> str:
    out = ["| kernel | kind | calls | M cycles | ms | work (M MACs or bit-MACs, all calls) "
           "| % of model peak | memory-bound |", "|---|---|---|---|---|---|---|---|"]
    ghz = r["ghz"]
    for k in sorted(r["kernels"], key=lambda k: -k["modelled"])[:top]:
        pct = "-" if k["pct_peak"] is None else f"{k['pct_peak']:.0f}%"
        mem = "yes" if k["memory_cycles"] > k["cycles"] else ""
        out.append(f"| `{k['name']}` | {k['kind']} | {k.get('calls', 1)} | "
                   f"{_mcyc(k['modelled'])} | "
                   f"{k['modelled'] / ghz / 1e6:.2f} | {k['work'] / 1e6:.1f} | {pct} | {mem} |")
    return "\n".join(out)


def section(found: list[dict], command: str) -> str:
    r0 = found[0]
    core = cm.core_of(r0["target"])
    pk = r0["peaks"]
    lines = [
        f"## ARM cycle model: {core.board} ({core.core}), modelled, not measured", "",
        f"Command: `{command}`. 1 thread, batch 1, {r0['size']}², random input. "
        "**These are a model's figures, not a board's**: block executions counted under "
        "qemu-aarch64 (the `block_counts` plugin) × llvm-mca steady-state cycles per block "
        f"(`{core.mca} -mcpu={core.mca_cpu}`), at {core.ghz} GHz, with a memory term (each "
        f"kernel's buffers once at {core.dram_gbs:g} GB/s) where it is the longer. "
        f"{core.note}. The model assumes every load hits L1, ignores branch mispredictions "
        "and counts code outside the model (TVM runtime, libc) at 1 cycle per instruction. "
        + calibration_text(r0), "",
        f"Model peaks on this core: {pk['bitmacs_per_cycle']:.1f} bit-MACs/cycle "
        "(128-bit AND + CNT + UADALP), "
        f"{pk['fmas_per_cycle']:.2f} fp32 FMAs/cycle (128-bit FMLA).", "",
        table(found), "",
        "'bound ms' is the model's own floor: every binary kernel's bit-MACs at the "
        "AND/popcount peak plus every float conv's and dense's MACs at the FMA peak, glue "
        "free; '% of bound' is that floor ÷ the modelled time. The M-cycle columns are per "
        "kind of kernel ('glue + other': BatchNorm, ReLU, adds, pooling, bit-packing, "
        "layout).", "",
    ]
    peers = r0.get("peers") or []
    if peers:
        cal = r0["calibration"]["factor"]
        lines += ["Peers through the same model on this core (whole process costed, "
                  "`cycle_model.process_estimate`; DRAM traffic from a simulation of the "
                  "board's data caches, `cache_misses` plugin):", "",
                  arm_peers.table(peers, cal), "",
                  "ort-fp32 is ONNX Runtime on ncnn's network converted to ONNX (random "
                  "weights); the ncnn rows are ncnn's benchmark ResNet-18 with benchncnn's "
                  "options and zero weights; the litert rows are LiteRT (XNNPACK) on a "
                  "Keras ResNet-18 with random weights, fp32 and full-integer int8 "
                  "(`make litert-models`). ncnn's 3×3 convs are Winograd (fewer MACs); "
                  "ONNX Runtime's and XNNPACK's are direct. A peer missing from the table "
                  "was skipped, and the run said why.", ""]
    for r in found:
        lines += [f"Heaviest kernels of {r['model']}:", "", kernel_table(r), ""]
    return "\n".join(lines)


def calibration_text(r: dict) -> str:
    """How far the model is from a board, in one paragraph (docs/arm-cycle-model.md has the
    method and the reasons)."""
    cal = r.get("calibration")
    if cal is None:
        return "Not calibrated in this run."
    peers = {p["peer"]: p for p in r.get("peers") or []}
    fp32 = peers.get("ncnn-fp32")
    if fp32 is not None and "published_ms" in fp32:
        seen = (f"ncnn's benchmark ResNet-18 fp32 (1 thread) models at {fp32['ms']:.1f} ms "
                f"against {fp32['published_ms']:g} ms published, model ÷ published "
                f"{fp32['model_over_published']:.2f}")
    else:
        seen = "recorded from the last run with the peers' sysroot (`make arm-peers`)"
    return (f"**Calibration** against a board: {seen}; the column '× calibration' is the raw "
            f"figure × {cal['factor']:.2f} (published ÷ modelled), printed beside the raw one, "
            "not instead of it (method: docs/arm-cycle-model.md).")
