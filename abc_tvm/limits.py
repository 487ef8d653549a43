"""What the compiled code cannot hold, said before TVM trips over it, and TVM's own errors
cut to one line.

TVM indexes a tensor with 32-bit integers: a tensor of more than 2^31 - 1 elements (e.g. a
1x3x10000x100000 image, or a 1x1x46341x46341 one) stops TVM's build with a 50-line
"Literal value ... exceeds range of int32" dump of TVMScript. `check_tensor_sizes` refuses
such a model up front, naming the layer whose output is too large; `tvm_error` turns
whatever TVM error still reaches the user into one line (measured boundary on TVM 0.2x:
46340x46340 builds, 46341x46341 fails).
"""

from __future__ import annotations

import math
import traceback

import onnx

from abc_tvm.errors import UserError

MAX_ELEMENTS = 2**31 - 1
LIMIT_TEXT = f"abc-tvm's limit of 2^31 - 1 = {MAX_ELEMENTS} elements per tensor (TVM " \
             "indexes tensors with 32-bit integers)"


def _static(t: onnx.ValueInfoProto) -> list[int] | None:
    """The tensor's shape when every dimension is a known positive number, else None."""
    tt = t.type.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
    return dims if all(d > 0 for d in dims) else None


def tensor_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of the graph's inputs, outputs and (by ONNX shape inference) its
    intermediate values; inference that fails leaves only the declared ones."""
    graph = proto.graph
    try:
        graph = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph
    except Exception:  # noqa: BLE001 - inference is a best effort; TVM's build still checks
        pass
    out: dict[str, list[int]] = {}
    for t in [*graph.input, *graph.value_info, *graph.output]:
        shape = _static(t)
        if shape is not None:
            out[t.name] = shape
    return out


def largest_tensor(proto: onnx.ModelProto) -> tuple[str, str, list[int]] | None:
    """(layer, value, shape) of the model's largest statically known tensor."""
    shapes = tensor_shapes(proto)
    producers = {o: n.name or f"{n.op_type}_{i}" for i, n in enumerate(proto.graph.node)
                 for o in n.output}
    best = max(shapes.items(), key=lambda kv: math.prod(kv[1]), default=None)
    if best is None:
        return None
    value, shape = best
    return producers.get(value, f"input {value}"), value, shape


def check_tensor_sizes(proto: onnx.ModelProto) -> None:
    """Refuse, in one line naming the layer, a model with a tensor TVM cannot index."""
    shapes = tensor_shapes(proto)
    inits = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        shape = shapes.get(inp.name)
        if inp.name not in inits and shape is not None and math.prod(shape) > MAX_ELEMENTS:
            raise UserError(f"input {inp.name!r} has shape {shape} = {math.prod(shape)} "
                            f"elements, more than {LIMIT_TEXT}: use a smaller input, or "
                            "split the image into tiles")
    for i, node in enumerate(proto.graph.node):
        for value in node.output:
            shape = shapes.get(value)
            if shape is not None and math.prod(shape) > MAX_ELEMENTS:
                name = node.name or f"{node.op_type}_{i}"
                raise UserError(f"layer {name} ({node.op_type}): its output {value!r} has "
                                f"shape {shape} = {math.prod(shape)} elements, more than "
                                f"{LIMIT_TEXT}: use a smaller input, or split the image "
                                "into tiles")


def from_tvm(e: BaseException) -> bool:
    """Whether the exception was raised inside TVM's C++ (its traceback ends in .cc/.h)."""
    frames = traceback.extract_tb(e.__traceback__)
    return any(f.filename.endswith((".cc", ".h", ".pxi")) for f in frames[-3:])


def tvm_error(e: BaseException) -> str:
    """A TVM error as one line: its message without the failed-check expression, and the
    pass it failed in; never the TVMScript dump that follows."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    head = lines[0]
    if head.startswith("Check failed:") and " is false:" in head:
        head = head.split(" is false:", 1)[1].strip()
    passes = [ln.removeprefix("Error in pass:").strip() for ln in lines
              if ln.startswith("Error in pass:")]
    if passes:
        head += f" (in TVM pass {passes[0]})"
    return head if len(head) <= 400 else head[:397] + "..."


def int32_overflow(e: BaseException) -> bool:
    """TVM's error for an index or shape that does not fit in 32 bits."""
    return "exceeds range of int32" in str(e)
