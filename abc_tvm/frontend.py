"""Load and validate an ONNX model, and import it into Relax.

Validation happens here, before TVM sees the model, so that every problem is reported as one
clear UserError (truncated file, bad opset, dynamic shape, missing initializer) instead of
a deep TVM traceback.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm.relax.frontend.onnx import from_onnx

from abc_tvm.errors import UserError
from abc_tvm.runtime import TensorInfo  # the manifest's entries: one definition

MIN_OPSET = 13
MAX_OPSET = 21
DTYPES = {onnx.TensorProto.FLOAT: "float32"}
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
          onnx.TensorProto.BFLOAT16)


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
    _check_graph(proto)
    _check_finite(proto)
    inputs(proto)  # static shapes, or a clear error
    return drop_dead_nodes(proto)


def _check_graph(proto: onnx.ModelProto) -> None:
    """What ONNX's checker lets through but ONNX Runtime refuses, and the matcher relies on."""
    if not proto.graph.output:
        raise UserError("the model has no graph outputs: there is nothing to compute")
    seen: set[str] = set()
    for node in proto.graph.node:
        if node.name and node.name in seen:
            raise UserError(f"two nodes are named {node.name!r}: node names must be unique")
        seen.add(node.name)


def constant_tensors(proto: onnx.ModelProto
                     ) -> list[tuple[onnx.TensorProto, onnx.NodeProto | None]]:
    """The graph's constants: each initializer (node None) and each Constant node's tensor."""
    consts: list[tuple[onnx.TensorProto, onnx.NodeProto | None]] = [
        (t, None) for t in proto.graph.initializer]
    consts += [(a.t, n) for n in proto.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
    return consts


def _check_finite(proto: onnx.ModelProto) -> None:
    """NaN or Inf in a weight (training diverged, a damaged file) would be folded into the
    thresholds and vanish from the output, where ONNX Runtime propagates it: refuse it."""
    for t, node in constant_tensors(proto):
        if t.data_type not in FLOATS:
            continue
        try:
            bad = int(np.count_nonzero(~np.isfinite(numpy_helper.to_array(t))))
        except Exception as e:  # data that does not fit its shape
            raise UserError(f"initializer {t.name!r} cannot be read: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        if bad:
            reader = node or next((n for n in proto.graph.node if t.name in n.input), None)
            where = f" (read by node {reader.name or reader.op_type})" if reader else ""
            raise UserError(f"{'constant' if node else 'initializer'} {t.name!r}{where} holds "
                            f"{bad} NaN or Inf value(s): abc-tvm compiles finite weights only "
                            "(a training that diverged, or a damaged file?)")


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name read inside an If/Loop/Scan body (outer-scope values are read implicitly)."""
    names: set[str] = set()
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_reads(n)
    return names


def drop_dead_nodes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes none of whose outputs reach a graph output go (TVM's importer drops them too,
    and a block matched on one would then be lost on the way to Relax)."""
    live = {o.name for o in proto.graph.output}
    keep = []
    for node in reversed(proto.graph.node):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(node.input)
            live.update(_subgraph_reads(node))
    if len(keep) == len(proto.graph.node):
        return proto
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.node[:]
    out.graph.node.extend(reversed(keep))
    return out


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
    message = None
    with _quiet_importer():
        try:
            return from_onnx(proto, shape_dict=shapes, keep_params_in_input=False)
        except Exception as e:
            message = (f"TVM's ONNX importer rejected the model: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}")
        gc.collect()  # the importer's BlockBuilder dies here, warning about open blocks
    raise UserError(message)


@contextlib.contextmanager
def _quiet_importer() -> Iterator[None]:
    """TVM's importer prints the failed operator to stdout and, from C++, a BlockBuilder
    warning to stderr when it fails: keep them from the user's one-line error (fd level)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            for f, stream in ((out, sys.stdout), (err, sys.stderr)):
                f.seek(0)
                text = f.read().decode(errors="replace")
                if failed or "Error converting operator" in text:
                    text = ""  # the failure becomes the UserError's line
                stream.write("".join(ln for ln in text.splitlines(keepends=True)
                                     if "BlockBuilder destroyed" not in ln))
                stream.flush()
