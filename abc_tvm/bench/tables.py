"""Tables of the results: models, layers, the issue's targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from abc_tvm.bench import float_ops
from abc_tvm.bench.common import CHECK_TOL, FLOAT_PEERS


def _ok(entry: dict | None) -> bool:
    return bool(entry) and "error" not in entry and "best_ms" in entry


def _fmt_ms(entry: dict | None) -> str:
    if not _ok(entry):
        if entry and "wrong" in entry:
            return "wrong result"
        return "failed" if entry and "error" in entry else ("n/a" if entry else "-")
    return f"{entry['best_ms']:.3f}"


def _ratio(a: dict | None, b: dict | None) -> float | None:
    """a's time / b's time (how many times faster b is), None if either is missing."""
    if _ok(a) and _ok(b):
        return a["best_ms"] / b["best_ms"]
    return None


def _fmt_x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


@dataclass
class Tables:
    """The result tables as rows of cells (printed aligned, or as Markdown)."""

    sections: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)

    def add(self, title: str, head: list[str], rows: list[list[str]]) -> None:
        self.sections.append((title, head, rows))

    def text(self) -> str:
        out = []
        for title, head, rows in self.sections:
            widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
            out.append(title)
            out.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
            out.append("  " + "  ".join("-" * w for w in widths))
            for r in rows:
                out.append("  " + "  ".join(str(c).ljust(w) for c, w in
                                            zip(r, widths, strict=True)))
            out.append("")
        return "\n".join(out)

    def markdown(self, level: str = "###") -> str:
        out = []
        for title, head, rows in self.sections:
            out += [f"{level} {title}", "", "| " + " | ".join(head) + " |",
                    "|" + "|".join("---" for _ in head) + "|"]
            out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
            out.append("")
        return "\n".join(out)


def _pct_range(pcts: list[float]) -> str:
    if not pcts:
        return "-"
    lo, hi = min(pcts), max(pcts)
    return f"{lo:.0f}%" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}%"


def _model_label(name: str, arch: str) -> str:
    if name in FLOAT_PEERS:
        return FLOAT_PEERS[name]
    mn = name.removeprefix("abc")
    m, n = mn.split("x")
    pretty = "ABC-ResNet-18" if arch == "abc_resnet18" else "ABC-ResNet-20"
    return f"abc-tvm {pretty} M={m} N={n}"


def suspicious(entry: dict) -> bool:
    """An output error above 1e-3 and above twice ONNX Runtime's own on the same ONNX."""
    err = entry.get("check_rel_err")
    if err is None or entry.get("approximate"):
        return False
    return err > max(CHECK_TOL, 2 * entry.get("ort_rel_err", 0.0)) or \
        entry.get("top1_match") is False


def _check(entry: dict) -> str:
    err = entry.get("check_rel_err")
    if err is None:
        return "-"
    text = f"{err:.1e}"
    if "ort_rel_err" in entry:
        text += f" (ORT {entry['ort_rel_err']:.1e})"
    return text + (" (!)" if suspicious(entry) else "")


def _float_ops_title(name: str, arch: str, threads: str, prof: dict) -> str:
    onnx = "the float twin's ONNX" if name == "tvm_fp32" else "the same ABC ONNX"
    return (f"Float layers of {_model_label(name, arch)} vs ONNX Runtime on {onnx}, per op, "
            f"{threads} thread(s), best of {prof['runs']} runs")


def build_tables(results: dict) -> Tables:
    """Tables for the terminal and the doc: peak, models, layers, thread scaling."""
    meta, runs = results["meta"], results.get("runs", {})
    tabs = Tables()
    rows = []
    for t, run in runs.items():
        if "peak" in run:
            p = run["peak"]
            rows.append([t, f"{p['gbitops_per_s']:.0f}", f"{p['gbitops_per_s_per_core']:.0f}",
                         ", ".join(p["popcount_insns"]) or "none"])
    if rows:
        tabs.add("Popcount peak (AND + popcount + add, L1-resident uint64 words)",
                 ["threads", "Gbit-ops/s", "per core", "popcount instruction"], rows)
    for t, run in runs.items():
        models = run.get("models")
        if not models:
            continue
        ort_e = models.get("ort")
        rows = []
        for name in [*FLOAT_PEERS, *[f"abc{m}" for m in meta["models"]]]:
            e = models.get(name)
            if e is None:
                continue
            med = f"{e['median_ms']:.3f}" if _ok(e) else "-"
            rows.append([_model_label(name, meta["arch"]), _fmt_ms(e), med,
                         _fmt_x(_ratio(ort_e, e)), _check(e) if _ok(e) else
                         e.get("error", "")[:60]])
        tabs.add(f"Whole models, {t} thread(s), batch 1, {meta['image_size']}x"
                 f"{meta['image_size']}", ["peer", "ms (best)", "ms (median)",
                                            "speed-up vs ORT",
                                            "max rel. err vs PyTorch"], rows)
    for t, run in runs.items():
        for name, prof in (run.get("float_ops") or {}).items():
            if "error" not in prof:
                tabs.add(_float_ops_title(name, meta["arch"], t, prof), float_ops.HEAD,
                         float_ops.rows(prof))
    for t, run in runs.items():
        lay = run.get("layers")
        if not lay:
            continue
        for mn in meta["models"]:
            m, n = (int(v) for v in mn.split("x"))
            rows = []
            for r in lay:
                if (r["M"], r["N"]) != (m, n):
                    continue
                a = r.get("abc", {})
                pct = f"{a['pct_peak']:.0f}%" if _ok(a) and a.get("pct_peak") else "-"
                im = r.get("in_model") or {}
                im_ms = ", ".join(f"{v:.3f}" for v in im.get("ms", [])) or "-"
                im_pct = _pct_range(im.get("pct_peak", []))
                im_mean = {"best_ms": im["mean_ms"]} if im.get("ms") else None
                rows.append([r["label"], str(r["count"]), im_ms, im_pct, _fmt_ms(a), pct,
                             _fmt_ms(r.get("topi_untuned")), _fmt_ms(r.get("topi_tuned")),
                             _fmt_x(_ratio(r.get("topi_tuned"), a)),
                             _fmt_x(_ratio(r.get("topi_tuned"), im_mean))])
            tabs.add(f"Binary layers, M={m} N={n}, {t} thread(s)",
                     ["layer (C->O HxW)", "x", "in model ms (each)", "% of peak in model",
                      "kernel ms (pack + conv)", "kernel % of peak", "TOPI untuned ms",
                      f"TOPI tuned ms ({meta['trials']} trials)", "kernel vs tuned TOPI",
                      "in model (mean) vs tuned TOPI"],
                     rows)
    ts = sorted(int(t) for t in runs if "models" in runs[t])
    if len(ts) >= 2:
        lo, hi = str(ts[0]), str(ts[-1])
        rows = []
        for name in [*FLOAT_PEERS, *[f"abc{m}" for m in meta["models"]]]:
            a, b = runs[lo]["models"].get(name), runs[hi]["models"].get(name)
            if _ok(a) and _ok(b):
                rows.append([_model_label(name, meta["arch"]), _fmt_ms(a), _fmt_ms(b),
                             _fmt_x(_ratio(a, b))])
        tabs.add(f"Thread scaling ({lo} -> {hi} threads)",
                 ["peer", f"{lo}T ms", f"{hi}T ms", "speed-up"], rows)
    return tabs


def targets(results: dict) -> list[list[str]]:
    """The issue's targets, each with the measured figure and met / not met."""
    meta, runs = results["meta"], results.get("runs", {})
    out: list[list[str]] = []

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "**not met**")

    one = runs.get("1") or (runs[min(runs, key=int)] if runs else {})
    models = one.get("models") or {}
    ort_e = models.get("ort")
    for mn, goal, text in (("1x1", 6.0, ">= 6x faster than ORT"),
                           ("3x3", 1.8, ">= 1.8x faster than ORT"),
                           ("5x5", 1 / 1.3, "<= 1.3x ORT's time")):
        r = _ratio(ort_e, models.get(f"abc{mn}"))
        if r is None:
            continue
        shown = f"{r:.2f}x faster" if mn != "5x5" else f"{1 / r:.2f}x ORT's time"
        out.append([f"M={mn[0]} N={mn[2]}: {text}", shown, verdict(r >= goal)])
    for mn in meta["models"]:
        rows = [r for r in one.get("layers") or [] if f"{r['M']}x{r['N']}" == mn]
        in_model = [p for r in rows for p in (r.get("in_model") or {}).get("pct_peak", [])]
        kernel = [r["abc"]["pct_peak"] for r in rows
                  if _ok(r.get("abc")) and r["abc"].get("pct_peak")]
        for pcts, where in ((in_model, "in the model"), (kernel, "standalone kernel")):
            if pcts:
                out.append([f"M={mn[0]} N={mn[2]}: every binary layer >= 50% of popcount peak "
                            f"({where})", f"min {min(pcts):.0f}% (max {max(pcts):.0f}%)",
                            verdict(min(pcts) >= 50)])
    for mn in meta["models"]:
        prof = (one.get("float_ops") or {}).get(f"abc{mn}") or {}
        hi = float_ops.worst(prof) if "abc" in prof else None
        if hi is not None:
            out.append([f"M={mn[0]} N={mn[2]}: every float layer <= 1.5x ORT's time for the "
                        "same op", f"max {hi[0]:.2f}x ({hi[1]}; {hi[2]} ops)",
                        verdict(hi[0] <= 1.5)])
    for mn in meta["topi_tuned"]:
        rows = [r for r in one.get("layers") or [] if f"{r['M']}x{r['N']}" == mn]
        for where, get in (
                ("standalone kernel", lambda r: r.get("abc")),
                ("in the model, mean", lambda r: {"best_ms": r["in_model"]["mean_ms"]}
                 if (r.get("in_model") or {}).get("ms") else None)):
            ratios = [_ratio(r.get("topi_tuned"), get(r)) for r in rows]
            ratios = [x for x in ratios if x is not None]
            if ratios:
                geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                out.append([f"M={mn[0]} N={mn[2]}: >= 1.5x faster than tuned TOPI on every "
                            f"layer ({where})", f"min {min(ratios):.2f}x (geomean {geo:.2f}x, "
                            f"{len(ratios)} layers)", verdict(min(ratios) >= 1.5)])
    ts = sorted(int(t) for t in runs if runs[t].get("models"))
    if 1 in ts and 2 in ts:
        for mn in meta["models"]:
            r = _ratio(runs["1"]["models"].get(f"abc{mn}"), runs["2"]["models"].get(f"abc{mn}"))
            if r is not None:
                out.append([f"M={mn[0]} N={mn[2]}: 2 threads >= 1.8x faster than 1",
                            f"{r:.2f}x", verdict(r >= 1.8)])
    return out


def _wrong_topi_note(results: dict) -> str:
    """How many TOPI builds (unscheduled or tuned records) computed a wrong result."""
    wrong = sum(int(r.get(key, {}).get("wrong_records_skipped", 0))
                for run in results["runs"].values() for r in run.get("layers", [])
                for key in ("topi_untuned", "topi_tuned"))
    return f"; {wrong} wrong build(s) in this run" if wrong else "; none was wrong in this run"
