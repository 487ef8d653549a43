"""The canonicalization stage: the ONNX a user brings -> the forms the matcher reads.

One pipeline, each rule small and tested on its own (`rules`), in front of the one matcher
(`abc_tvm.pattern`): straight-through residues removed, constants folded by ONNX Runtime
(weights computed from latent weights, shape arithmetic), near-binary weights snapped,
conv biases split off as glue, MaxPool moved before a Sign, binary fully-connected layers
as 1×1 convs.
"""

from __future__ import annotations

import onnx

from abc_tvm.canonical import rules
from abc_tvm.canonical.fold import fold_constants, needs_folding
from abc_tvm.canonical.graph import Graph
from abc_tvm.canonical.rules import Note

__all__ = ["Note", "canonicalize"]


def canonicalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Note]]:
    """The canonical model and the notes of every rule that changed it."""
    g = Graph(model)
    notes = rules.straight_through(g)
    model = g.to_model() if notes else model
    if needs_folding(model):
        model = fold_constants(model)
        notes.append(Note("", "fold_constants", "constants folded by ONNX Runtime"))
    g = Graph(model)
    changed = (rules.snap_weights(g) + rules.split_conv_bias(g) + rules.pool_before_sign(g)
               + rules.binary_fc_as_conv(g))
    if changed:
        model = g.to_model()
    return model, notes + changed
