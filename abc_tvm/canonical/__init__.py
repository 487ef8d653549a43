"""The canonicalization stage: the ONNX a user brings -> the forms the matcher reads.

One pipeline, each rule small and tested on its own (`rules`), in front of the one matcher
(`abc_tvm.pattern`): QONNX quantizers as standard ops (`qonnx`), straight-through residues
removed, `expand_as` broadcasts read as the constant itself, ABC weights computed from
latent weights read as their bases (`abc_weights`; kept as such through folding), constants
folded by ONNX Runtime (weights computed from latent weights, shape arithmetic), tf2onnx's
NHWC<->NCHW transposes and reshapes cancelled (`transpose`), `tf.clip_by_value` as Clip, near-binary
weights snapped (±α, or Σ α_m B_m within float rounding), conv biases split off as glue,
MaxPool moved before a binarizer, binary fully-connected layers as 1×1 convs.
"""

from __future__ import annotations

import onnx

from abc_tvm.canonical import abc_weights, rules
from abc_tvm.canonical.fold import fold_constants, needs_folding
from abc_tvm.canonical.graph import Graph
from abc_tvm.canonical.qonnx import lower_qonnx
from abc_tvm.canonical.rules import Note
from abc_tvm.canonical.transpose import push_transposes

__all__ = ["Note", "canonicalize", "rules_for", "summary_lines"]


def canonicalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Note]]:
    """The canonical model and the notes of every rule that changed it."""
    g = Graph(model)
    notes = (lower_qonnx(g) + rules.straight_through(g) + rules.expand_as_broadcast(g)
             + abc_weights.read_bases(g))
    if notes:
        model = g.to_model()
    if needs_folding(model):
        model = fold_constants(model)
        notes.append(Note("", "fold_constants", "constants folded by ONNX Runtime"))
    g = Graph(model)
    changed = (push_transposes(g) + rules.min_max_as_clip(g) + rules.snap_weights(g)
               + rules.split_conv_bias(g) + rules.pool_before_binarizer(g)
               + rules.binary_fc_as_conv(g) + abc_weights.snap_folded(g))
    if changed:
        model = g.to_model()
    return model, notes + changed


def rules_for(notes: list[Note], ops: list[str]) -> list[str]:
    """The rules that shaped a layer made of `ops`, and those applied to the whole model."""
    return sorted({n.rule for n in notes if not n.node or n.node in ops})


def summary_lines(notes: list[Note]) -> list[str]:
    """For reports: each rule with its count, then every snapped layer."""
    counts: dict[str, int] = {}
    for n in notes:
        counts[n.rule] = counts.get(n.rule, 0) + 1
    lines = ["canonicalized: " + ", ".join(f"{r} x{k}" for r, k in counts.items())] \
        if counts else []
    return lines + [f"  snapped: {n.node} ({n.detail})" for n in notes
                    if n.rule in ("snap_weights", "snap_folded")]
