"""Load and validate an ONNX model, and import it into Relax.

Validation happens here, before TVM sees the model, so that every problem is reported as one
clear UserError (truncated file, bad opset, dynamic shape, missing initializer) instead of
a deep TVM traceback.
"""

from __future__ import annotations

import os

import onnx
import tvm
from tvm.relax.frontend.onnx import from_onnx

from abc_tvm.errors import UserError
from abc_tvm.runtime import TensorInfo  # the manifest's entries: one definition

MIN_OPSET = 13
MAX_OPSET = 21
DTYPES = {onnx.TensorProto.FLOAT: "float32"}


def load(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read, check and shape-infer an ONNX model; a UserError says what is wrong."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise UserError(f"no such model file: {path}")
        try:
            proto = onnx.load(path)
        except Exception as e:  # protobuf raises DecodeError, among others
            raise UserError(f"{path} is not a readable ONNX model (truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from None
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"unsupported ONNX opset {opset}: abc-tvm reads opsets {MIN_OPSET}-"
                        f"{MAX_OPSET}; re-export with opset 17 (abc_tvm.export.to_onnx does)")
    _check_initializers(proto)
    try:
        onnx.checker.check_model(proto, full_check=False)
        proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as e:
        raise UserError(f"invalid ONNX model: {str(e).splitlines()[0]}") from None
    inputs(proto)  # static shapes, or a clear error
    return proto


def _check_initializers(proto: onnx.ModelProto) -> None:
    """Every node input must be a graph input, an initializer or another node's output."""
    known = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        for name in node.input:
            if name and name not in known:
                raise UserError(f"node {node.name or node.op_type} reads {name!r}, which is no "
                                "input, initializer or node output (missing initializer?)")
        known.update(node.output)


def _info(value: onnx.ValueInfoProto, role: str) -> TensorInfo:
    t = value.type.tensor_type
    dims = []
    for i, d in enumerate(t.shape.dim):
        if not d.HasField("dim_value") or d.dim_value <= 0:
            raise UserError(f"{role} {value.name!r} has a dynamic dimension {i} "
                            f"({d.dim_param or '?'}): abc-tvm compiles static shapes only; "
                            "re-export with a fixed input shape")
        dims.append(d.dim_value)
    if t.elem_type not in DTYPES:
        raise UserError(f"{role} {value.name!r} has dtype "
                        f"{onnx.TensorProto.DataType.Name(t.elem_type)}; only float32 is supported")
    return TensorInfo(value.name, tuple(dims), DTYPES[t.elem_type])


def inputs(proto: onnx.ModelProto) -> list[TensorInfo]:
    """The graph inputs that are not initializers, with static shapes."""
    inits = {t.name for t in proto.graph.initializer}
    return [_info(v, "input") for v in proto.graph.input if v.name not in inits]


def outputs(proto: onnx.ModelProto) -> list[TensorInfo]:
    return [_info(v, "output") for v in proto.graph.output]


def to_relax(proto: onnx.ModelProto) -> tvm.IRModule:
    """Import into Relax with the weights as constants (the ABC pass reads them)."""
    shapes = {i.name: list(i.shape) for i in inputs(proto)}
    try:
        return from_onnx(proto, shape_dict=shapes, keep_params_in_input=False)
    except Exception as e:
        raise UserError(f"TVM's ONNX importer rejected the model: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
