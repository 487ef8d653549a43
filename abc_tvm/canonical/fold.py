"""Constant folding by ONNX Runtime's offline basic-level optimiser.

Research code computes its binary weights from the latent ones at run time (mean|W|·sign W,
standardisation, power-of-two scales) and its pad amounts from shape arithmetic; TVM's
importer folds neither (it refuses computed pads outright). ONNX Runtime's basic level folds
all of it and fuses BatchNorm, Mul and Add into a preceding Conv, using only standard ONNX
ops, so its output is still a model TVM imports and any runtime runs. Kept a library call
rather than a hand-written evaluator: it knows every op's semantics.

ONNX Runtime's fusions of BatchNorm/Mul/Add into a Conv are turned off: the binary kernels
fuse that glue themselves, and a fused β would give each plane's conv of an ABC block its
own weight. A model with nothing to fold (abc-tvm's own export: its stacked weight product
is read by the matcher as it is) is returned unchanged, so it compiles as before, bit for bit.
Stacked ABC weights (`abc_weights.held_for_folding`) are held out of the folding: folded,
they would be one constant to decompose again, and rounding decides whether that is exact.
"""

from __future__ import annotations

import os
import tempfile

import onnx

from abc_tvm.canonical.abc_weights import held_for_folding
from abc_tvm.errors import UserError

# What the matcher folds itself (the ABC contract's weight product and its casts).
_MATCHER_FOLDS = {"Mul", "ReduceSum", "Identity", "Cast", "Constant"}
_KEPT_AS_WRITTEN = ["ConvBNFusion", "ConvMulFusion", "ConvAddFusion"]


def needs_folding(model: onnx.ModelProto) -> bool:
    """Whether any node computes from constants alone (beyond what the matcher folds), or
    reads a shape (shape arithmetic that feeds Pad, Reshape, Slice)."""
    known = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Shape":
            return True
        if node.op_type == "Constant" or (
                node.input and all(not i or i in known for i in node.input)):
            if node.op_type not in _MATCHER_FOLDS:
                return True
            known.update(node.output)
    return False


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model after ONNX Runtime's basic graph optimisations: constants folded, redundant
    nodes removed; Conv fusions off (see the module doc)."""
    import onnxruntime as ort

    held = held_for_folding(model)
    listed = {i.name for i in model.graph.input}
    model, moved = _lift(model, held) if held else (model, [])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "folded.onnx")
        opts.optimized_model_filepath = path
        try:
            ort.InferenceSession(model.SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"],
                                 disabled_optimizers=_KEPT_AS_WRITTEN)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"ONNX Runtime could not fold the model's constants: "
                            f"{str(e).splitlines()[0]}") from None
        folded = onnx.load(path)
    return _restore(folded, moved, listed) if moved else folded


def _lift(model: onnx.ModelProto, names: set[str]
          ) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """The model with these initializers as graph inputs, and the initializers: ONNX Runtime
    folds nothing that reads a graph input (the stacked ABC weights keep their α and bases,
    see `abc_weights.held_for_folding`)."""
    lifted = onnx.ModelProto()
    lifted.CopyFrom(model)
    g = lifted.graph
    moved = [t for t in g.initializer if t.name in names]
    keep = [t for t in g.initializer if t.name not in names]
    del g.initializer[:]
    g.initializer.extend(keep)
    listed = {i.name for i in g.input}
    g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in moved if t.name not in listed)
    return lifted, moved


def _restore(folded: onnx.ModelProto, moved: list[onnx.TensorProto],
             listed: set[str]) -> onnx.ModelProto:
    """The lifted initializers back as initializers (graph inputs again only where the
    model listed them as inputs before)."""
    g = folded.graph
    names = {t.name for t in moved}
    inputs = [i for i in g.input if i.name not in names or i.name in listed]
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend(moved)
    return folded
