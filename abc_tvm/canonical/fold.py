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
"""

from __future__ import annotations

import os
import tempfile

import onnx

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
    return folded
