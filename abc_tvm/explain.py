"""`abc-tvm inspect`: what the compiler will make of each conv and FC of a model, and why.

Runs the same stages `compile` runs before TVM (load, canonicalize, match) and prints, per
Conv/Gemm/MatMul of the canonical model, whether it becomes a binary kernel (its M, N,
binarizer and the canonicalization rules that shaped it) or stays float and the reason.
"""

from __future__ import annotations

import os

import onnx

from abc_tvm.blocks import match
from abc_tvm.canonical import rules_for, summary_lines

_LAYERS = ("Conv", "Gemm", "MatMul")


def inspect_model(model: str | os.PathLike | onnx.ModelProto,
                  output: str | os.PathLike | None = None) -> tuple[list[dict], list]:
    """One entry per conv/FC of the canonical model (and write that model to `output`)."""
    canonical, notes, blocks, misses = match(model)  # what compile decides, and nothing else
    if output is not None:
        onnx.save(canonical, os.fspath(output))
    by_op = {op: b for b in blocks for op in b.ops}
    why = {m.name: m.reason for m in misses}
    rows = []
    for i, node in enumerate(canonical.graph.node):
        if node.op_type not in _LAYERS:
            continue
        name = node.name or f"{node.op_type}_{i}"
        blk = by_op.get(name)
        if blk is None:
            rows.append({"name": name, "op": node.op_type, "binary": False,
                         "reason": why.get(name, "not a binary layer (float op)")})
            continue
        if blk.name != name:
            continue  # another plane's conv of the same block: listed once, under the block
        rows.append({"name": name, "op": node.op_type, "binary": True, **blk.summary(),
                     "rules": rules_for(notes, [blk.name, *blk.ops])})
    return rows, notes


def format_rows(rows: list[dict], notes: list) -> str:
    binary = [r for r in rows if r["binary"]]
    lines = [f"{len(binary)} of {len(rows)} conv/FC layer(s) become binary kernels"]
    for r in rows:
        if r["binary"]:
            o, i, (kh, kw) = r["out_channels"], r["in_channels"], r["kernel"]
            lines.append(f"  binary  {r['name'][-40:]:<40} M={r['M']} N={r['N']} {r['act']:<8} "
                         f"({o},{i},{kh},{kw}) alpha/{r['alpha']}  {r['binarizer']}; "
                         f"rules: {', '.join(r['rules']) or '-'}")
        else:
            lines.append(f"  float   {r['name'][-40:]:<40} {r['op']}: {r['reason']}")
    return "\n".join(lines + summary_lines(notes))
