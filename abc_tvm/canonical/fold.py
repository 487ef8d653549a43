"""Constant folding by ONNX Runtime's offline basic-level optimiser.

Research code computes its binary weights from the latent ones at run time (mean|W|·sign W,
standardisation, power-of-two scales) and its pad amounts from shape arithmetic; TVM's
importer folds neither (it refuses computed pads outright). ONNX Runtime's basic level folds
all of it and fuses BatchNorm, Mul and Add into a preceding Conv, using only standard ONNX
ops, so its output is still a model TVM imports and any runtime runs. Kept a library call
rather than a hand-written evaluator: it knows every op's semantics.
"""

from __future__ import annotations

import os
import tempfile

import onnx

from abc_tvm.errors import UserError


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model after ONNX Runtime's basic graph optimisations (constant folding, fusions)."""
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
                                 providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"ONNX Runtime could not fold the model's constants: "
                            f"{str(e).splitlines()[0]}") from None
        folded = onnx.load(path)
    return folded
