"""The Markdown section of `docs/benchmarks.md`, the chart and the console report.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from abc_tvm.bench.common import FLOAT_PEERS, Config, host_mcpu, load_benchmark
from abc_tvm.bench.jobs import PROFILE_MIN_S
from abc_tvm.bench.tables import _model_label, _ok, _wrong_topi_note, build_tables, targets


def section_title(results: dict) -> str:
    """The doc section a run writes: one per CPU model (`## x86: znver5`), so that runs on
    CPUs with and without AVX-512 VPOPCNTDQ keep their figures side by side."""
    target = results.get("meta", {}).get("target", "x86")
    if target != "x86":  # another x86 build timed on this CPU: its own section
        return f"## x86: {_mcpu(results)} build (run on {host_mcpu()})"
    return f"## x86: {_mcpu(results)}"


def _peak_kernel_note(results: dict) -> str:
    """How the peak kernel counted bits on this CPU (its asm, as `measure_peak` found it)."""
    insns = sorted({i for run in results.get("runs", {}).values()
                    for i in run.get("peak", {}).get("popcount_insns", [])})
    how = ", ".join(insns) or "unknown"
    if "vpopcntq" in insns:
        return f"{how}: a 4×4-zmm register tile, 16 VPOPCNTQ per 8 loads"
    return f"{how}: LLVM's popcount without AVX-512 VPOPCNTDQ (nibble table, byte sums)"


def doc_section(results: dict, doc_path: Path | None, plot: Path | None) -> str:
    """The Markdown '## x86: <cpu>' section: setup, command, tables, targets."""
    meta = results["meta"]
    mach = meta["machine"]
    size = meta["image_size"]
    pretty = "ABC-ResNet-18" if meta["arch"] == "abc_resnet18" else "ABC-ResNet-20 (--quick)"
    lines = [section_title(results), "",
             f"Latest run: {meta['date']}, {meta['wall_s'] / 60:.1f} min wall time, "
             f"produced by", "", "```sh", meta["command"], "```", "",
             f"- Machine: {mach['cpu']}, {mach['cores']} cores visible, AVX-512 VPOPCNTDQ "
             f"{'yes' if mach['avx512_vpopcntdq'] else 'no'}; matrix/int8 features: "
             f"{mach.get('matrix', '-')}; TVM target `llvm -mcpu` "
             f"{_mcpu(results)}; Linux {mach['kernel']}.",
             f"- Software: apache-tvm {mach['apache-tvm']} (ffi {mach['apache-tvm-ffi']}), "
             f"onnxruntime {mach['onnxruntime']}, openvino {mach.get('openvino', '-')}, "
             f"torch {mach['torch']}, Python "
             f"{mach['python']}.",
             f"- Workload: {pretty} (`abc_tvm.models`), bipolar activations, one α per layer, "
             f"batch 1, {size}x{size} float32 input; threads {', '.join(map(str, meta['threads']))}"
             f" (each thread count in its own process: TVM_NUM_THREADS, OMP_NUM_THREADS, ORT "
             f"intra-op threads and torch.set_num_threads all set to it).",
             "- Float peers run the float twin (`abc_tvm.models.float_twin`: every ABC conv "
             "replaced by an ordinary conv with the weight Σ α_m B_m, here of the M = N = 1 "
             "model; same architecture and FLOPs for every M, N): ONNX Runtime (CPU EP, all "
             "graph optimisations, sequential) in fp32 and in int8 (the twin quantized by "
             "ORT's static QDQ quantizer: per-channel s8 weights, u8 activations, MinMax "
             "calibration on 8 inputs), OpenVINO (CPU plugin, latency hint) at its default "
             "precision (bf16 where the CPU has AVX-512 BF16 or AMX, else fp32) and on the QDQ "
             "model (int8), PyTorch eager "
             "(inference_mode), and TVM fp32 = the twin's ONNX through `compile_model` with "
             "its default float schedule, "
             + ("tuned with the given log." if meta.get("tuning_log") else
                "**untuned** (compiled with no tuning database, shipped ones included). "
                "abc-tvm models: compiled as "
                "`abc-tvm compile` does, with the shipped tuning databases that match their "
                "kernels: " + _tuning_note(results, None) + "."),
             "- Timing: each peer warmed up, then "
             f"{meta['repeat']} samples interleaved across peers (one round times every peer "
             "once); a sample is the mean of enough calls to last ≥ "
             f"{meta.get('min_sample_s', 0.2)} s "
             "(TVM via "
             "`time_evaluator`, ORT and PyTorch via a Python loop). \"best\" is the fastest "
             "sample and is what speed-ups use; the median shows the noise (shared machine). "
             "\"max rel. err\" is each output against the PyTorch model's (the ABC model's "
             "for abc-tvm, the float twin's for float peers), as max|y−ref|/max|ref|; in "
             "brackets, ONNX Runtime's error on the same ABC ONNX: binarisation turns float "
             "rounding into flipped bits (x + v ≈ 0.5), so for M, N > 1 two correct float "
             "runtimes already differ by ~1e-2. (!) marks an error above 1e-3 and above twice "
             "ORT's, or a different top-1 class.",
             "- Bit-ops: one bit-op is one bit pair through AND + popcount + accumulate (one "
             "binary multiply-accumulate). A layer does B·OH·OW·O·C·KH·KW·M·N of them; the "
             "peak is `benchmarks/popcount_peak.py`: a TVM kernel doing AND + popcount + add "
             "over L1-resident words, the popcount as LLVM emits it for this CPU ("
             f"{_peak_kernel_note(results)}), bit-ops/s = 64 × words/s, measured at the start of "
             "each thread count's run and again after its layers, the higher kept. \"% of "
             "peak\" = layer bit-ops/s ÷ peak at the same thread count.",
             "- Binary layers are timed two ways. **In model**: every ABC kernel call of the "
             "compiled model, timed by a Relax VM instrument (best of at least "
             f"{meta['repeat']} runs and {PROFILE_MIN_S:.0f} s of runs, per instance, "
             "in model order; a bit-pack call is added to the conv it feeds); these kernels "
             "also carry whatever glue the compiler fused into them (BatchNorm, residual, ReLU, "
             "packing the next layer's input), so their % of peak is a lower bound. "
             "**Kernel**: abc-tvm's standalone bit-pack (float NCHW → N planes) plus fused "
             "conv (`abc_tvm.schedules.bitpack_func` + `abc_conv_func`, hand-written "
             "schedule, 0 tuning trials): the like-for-like peer of TOPI, which also packs its "
             "activations inside the timed kernel.",
             "- Float layers, per op: in the same process and at the same thread count, every "
             "kernel call of the compiled model (Relax VM instrument) and every node of ONNX "
             "Runtime on the same ONNX (its profiler's per-node kernel time; the float twin's "
             "ONNX for TVM fp32, the ABC ONNX for abc-tvm), best of the runs named in each "
             "title, in interleaved rounds (`abc_tvm/bench/float_ops.py`). A call and a node "
             "are paired by op kind and shapes (conv: channels, input size, out channels, "
             "kernel, output size; FC: features; pools and the rest: their dimensions other "
             "than 1 in any order, NHWC against NCHW, a fused kernel by its first op that is "
             "not a transpose or reshape), in model order within one key; both runtimes fuse "
             "the epilogue (bias, residual add, ReLU) into the conv. An unpaired call shows - "
             "for ORT; unpaired ORT nodes are summed by op kind as \"ORT only\" (in an ABC "
             "model mostly the binarizers' elementwise ops and ORT's NCHWc reorders, work that "
             "abc-tvm does inside its bit-pack and binary kernels), and ORT convs with the "
             "shape of one of abc-tvm's binary kernels are summed apart. abc-tvm / ORT above "
             "1 means abc-tvm is slower.",
             "- TOPI peer: TVM's `topi.nn.bitserial_conv2d_nhwc` (activation_bits = N, "
             "weight_bits = M, uint64 words, unipolar = {0,1} activations × ±1 weights, int32 "
             "out), its activations bit-packed inside the timed kernel and its weights packed "
             "ahead (`benchmarks/topi_bitserial.py`); \"untuned\" is `tvm.compile` of TOPI's "
             f"unscheduled PrimFunc, \"tuned\" is MetaSchedule `tune_tir` with {meta['trials']} "
             f"trials per layer ({meta['search']}), tuned for "
             f"{', '.join(meta['topi_tuned']) or 'no'} M×N; the tuned time is that of the "
             f"fastest of its {load_benchmark('topi_bitserial').TUNED_CANDIDATES} best records "
             "whose output equals a NumPy reference (every TOPI build is checked; a wrong one "
             "is reported, not timed)"
             f"{_wrong_topi_note(results)}.",
             ""]
    if plot is not None and Path(plot).is_file():
        rel = os.path.relpath(Path(plot).resolve(), (doc_path or Path(".")).resolve().parent)
        lines += [f"![x86 benchmark]({rel})", ""]
    tgt = targets(results)
    if tgt:
        lines += ["### Targets (1 thread unless stated)", "",
                  "| target | measured | |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in tgt]
        lines.append("")
    lines.append(build_tables(results).markdown("###"))
    errors = all_errors(results)
    if errors:
        lines += ["### Errors in this run", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(lines).rstrip() + "\n"


def all_errors(results: dict) -> list[str]:
    """Job failures, plus every peer or layer that failed inside a measurement."""
    out = list(results.get("errors", []))
    for t, run in results.get("runs", {}).items():
        for name, e in (run.get("models") or {}).items():
            if "error" in e:
                out.append(f"{t}T {name}: {e['error'][:300]}")
        for name, prof in (run.get("float_ops") or {}).items():
            if "error" in prof:
                out.append(f"{t}T float ops of {name}: {prof['error'][:300]}")
        for r in run.get("layers") or []:
            for key in ("abc", "topi_untuned", "topi_tuned"):
                if "error" in r.get(key, {}):
                    out.append(f"{t}T {r['label']} M{r['M']}N{r['N']} {key}: "
                               f"{r[key]['error'][:300]}")
    return out


def _mcpu(results: dict) -> str:
    for run in results.get("runs", {}).values():
        tgt = run.get("peak", {}).get("target")
        if tgt:
            try:
                return json.loads(tgt).get("mcpu", "?")
            except ValueError:
                return "?"
    return "?"


def _tuning_note(results: dict, names: list[str] | None) -> str:
    """The tuning databases applied to the compiled models `names` (None: the ABC ones)."""
    compiled = results.get("compiled", {})
    names = [n for n in compiled if n != "float_twin"] if names is None else names
    dbs = sorted({f"{Path(d).name} ({n})" for n in names
                  for d in compiled.get(n, {}).get("tuning_databases", [])})
    return ", ".join(dbs) if dbs else "none did"


def write_doc(path: Path, section: str) -> None:
    """Replace the section of `path` that has the title of `section` (its first line), keeping
    every other section; a new one goes after the last x86 section, else first."""
    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        lines = ["# Benchmarks", "", *lines]
    title = section.splitlines()[0].strip()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        x86 = [i for i, line in enumerate(lines) if line.startswith("## x86")]
        at = next((j for j in range(x86[-1] + 1, len(lines)) if lines[j].startswith("## ")),
                  len(lines)) if x86 else 1
        head, body = lines[:at], lines[at:]
        while body and not body[0].strip():
            body = body[1:]
        while len(head) > 1 and not head[-1].strip():
            head = head[:-1]
        new = [*head, "", *section.rstrip("\n").splitlines(), *([""] if body else []), *body]
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")),
                   len(lines))
        tail = lines[end:]
        new = [*lines[:start], *section.rstrip("\n").splitlines(), *([""] if tail else []),
               *tail]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def plot_results(results: dict, path: Path) -> None:
    """Bar charts: whole-model latency per peer and thread count; per-layer latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, runs = results["meta"], results.get("runs", {})
    names = [*FLOAT_PEERS, *[f"abc{m}" for m in meta["models"]]]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    ax = axes[0]
    ts = [t for t in runs if runs[t].get("models")]
    width = 0.8 / max(1, len(ts))
    for i, t in enumerate(ts):
        vals = [runs[t]["models"].get(n, {}).get("best_ms", 0) if _ok(runs[t]["models"].get(n))
                else 0 for n in names]
        xs = [j + i * width for j in range(len(names))]
        bars = ax.bar(xs, vals, width, label=f"{t} thread(s)")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(ts) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels([_model_label(n, meta["arch"]).replace("abc-tvm ", "abc-tvm\n")
                        .replace(" (compile_model)", "").replace(" fp32", "\nfp32")
                        for n in names], fontsize=7)
    ax.set_ylabel("latency, ms (best sample)")
    ax.set_title(f"Whole model, batch 1, {meta['image_size']}x{meta['image_size']}")
    ax.legend()
    ax = axes[1]
    t0 = min(runs, key=int) if runs else None
    lay = [r for r in (runs.get(t0, {}).get("layers") or [])
           if f"{r['M']}x{r['N']}" in meta["topi_tuned"]] if t0 else []
    if not lay and t0:
        lay = runs[t0].get("layers") or []
    series = (("in_model", "abc-tvm in model (mean)"), ("abc", "abc-tvm kernel"),
              ("topi_untuned", "TOPI untuned"),
              ("topi_tuned", f"TOPI tuned ({meta['trials']} trials)"))
    bw = 0.2
    for i, (key, label) in enumerate(series):
        if key == "in_model":
            vals = [(r.get("in_model") or {}).get("mean_ms", 0) for r in lay]
        else:
            vals = [r[key]["best_ms"] if _ok(r.get(key)) else 0 for r in lay]
        ax.bar([j + i * bw for j in range(len(lay))], vals, bw, label=label)
    ax.set_xticks([j + 1.5 * bw for j in range(len(lay))])
    ax.set_xticklabels([f"{r['label']}\nM{r['M']}N{r['N']}" for r in lay], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log)")
    ax.set_title(f"Binary 3x3 layers, {t0} thread(s)")
    ax.legend()
    fig.suptitle(f"abc-tvm bench, {meta['machine']['cpu']}, {meta['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, cfg: Config) -> str:
    """Print the tables, write the plot, the JSON beside it, and the doc section."""
    text = build_tables(results).text()
    tgt = targets(results)
    if tgt:
        w = max(len(a) for a, _, _ in tgt)
        text += "Targets (1 thread)\n" + "\n".join(
            f"  {a.ljust(w)}  {b:<32} {c.replace('**', '')}" for a, b, c in tgt) + "\n"
    if cfg.plot is not None:
        plot_results(results, cfg.plot)
        shutil.copyfile(cfg.work_dir / "results.json", cfg.plot.with_suffix(".json"))
        text += f"\nwrote {cfg.plot} and {cfg.plot.with_suffix('.json')}"
    if cfg.doc is not None:
        write_doc(cfg.doc, doc_section(results, cfg.doc, cfg.plot))
        text += f"\nwrote section '{section_title(results)}' of {cfg.doc}"
    text += f"\nresults: {cfg.work_dir / 'results.json'} ({results['meta']['wall_s'] / 60:.1f} min)"
    for e in all_errors(results):
        text += f"\nerror: {e}"
    return text
