"""Binary blocks decided once: the canonical ONNX is matched a single time, and every block
it recognises is carried to Relax as one explicit op, which the rewrite lowers to kernels.

    model.onnx -> canonicalize -> find_abc_blocks (the one decision) -> explicit ONNX
      (each block one `ai.abc_tvm.ABCBlock` node: X -> Y) -> Relax (each block one
      `call_dps_packed("abc_tvm.block.<i>", X)`) -> relay_passes.abc_rewrite (kernels)

Nothing after the match re-reads binarizers or weights: the facts travel by index in the
block list. `front(model)` is the one path `compile`, `tune` and `inspect` share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import tvm
from tvm import relax

from abc_tvm import frontend, pattern
from abc_tvm.canonical import Note, canonicalize
from abc_tvm.canonical.graph import Graph
from abc_tvm.errors import UserError

DOMAIN = "ai.abc_tvm"
OP = "ABCBlock"
EXTERN = "abc_tvm.block."  # + block index: the Relax call the rewrite replaces


@dataclass
class Front:
    """A model after the front end: its canonical ONNX, the rules that shaped it, the binary
    blocks and the convs that stay float (with the reason), and the Relax module in which
    each block is one explicit call."""

    proto: onnx.ModelProto  # canonical, runnable by any ONNX runtime
    notes: list[Note]
    blocks: list[pattern.ABCBlock]
    misses: list[pattern.Miss]
    mod: tvm.IRModule


def match(model: str | os.PathLike | onnx.ModelProto
          ) -> tuple[onnx.ModelProto, list[Note], list[pattern.ABCBlock], list[pattern.Miss]]:
    """Load, canonicalize and match once: (canonical model, notes, blocks, float convs)."""
    proto, notes = canonicalize(frontend.load(model))
    blocks, misses = pattern.find_abc_blocks(pattern.from_onnx(proto))
    for miss in misses:
        if miss.error:
            raise UserError(f"{miss.name}: {miss.reason}")
    return proto, notes, blocks, misses


def front(model: str | os.PathLike | onnx.ModelProto) -> Front:
    """`match`, then the Relax import with every block one explicit call."""
    proto, notes, blocks, misses = match(model)
    with _block_converter():
        mod = frontend.to_relax(explicit(proto, blocks))
    return Front(proto, notes, blocks, misses, mod)


def explicit(proto: onnx.ModelProto, blocks: list[pattern.ABCBlock]) -> onnx.ModelProto:
    """The model with each block's output written by one ABCBlock node reading its input;
    the ops that computed it (binarizers, convs, β, the plane sum) are dropped when nothing
    else reads them."""
    if not blocks:
        return proto
    g = Graph(proto)
    for i, blk in enumerate(blocks):
        prev = g.producer(blk.output)
        g.rename_output(prev, blk.output, g.fresh(blk.output))
        O, _, kh, kw = (int(d) for d in blk.bases.shape[1:])  # noqa: N806
        g.add_node_named(OP, [blk.input], [blk.output], blk.name, domain=DOMAIN, index=i,
                         out_channels=O, kernel_shape=[kh, kw], strides=list(blk.strides),
                         pads=list(blk.pads))
    model = g.to_model()
    model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return model


class _ABCBlockConverter:
    """TVM ONNX-importer converter: ABCBlock -> call_dps_packed to the block's extern name,
    with the conv's output shape; abc_rewrite replaces every such call."""

    @classmethod
    def get_converter(cls, _opset: int):
        return cls._impl

    @classmethod
    def _impl(cls, bb, inputs, attr, _params):
        x = inputs[0]
        b, _, h, w = (int(d) for d in x.ty.shape)
        kh, kw = attr["kernel_shape"]
        sh, sw = attr["strides"]
        top, left, bottom, right = attr["pads"]
        shape = (b, int(attr["out_channels"]), (h + top + bottom - kh) // sh + 1,
                 (w + left + right - kw) // sw + 1)
        return relax.call_dps_packed(f"{EXTERN}{int(attr['index'])}", [x],
                                     relax.TensorType(shape, "float32"))


@contextlib.contextmanager
def _block_converter() -> Iterator[None]:
    """TVM 0.27's importer has no hook for custom ops: its converter map is extended for
    the duration of one import (the map is rebuilt by every lookup, so this is all it takes)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map

    def extended() -> dict:
        return {**original(), OP: _ABCBlockConverter}

    onnx_frontend._get_convert_map = extended
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def block_index(call: relax.Call) -> int | None:
    """The block index of an explicit block call, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
            and call.op.name == "relax.call_dps_packed"):
        return None
    fn = call.args[0]
    name = str(fn.global_symbol) if isinstance(fn, relax.ExternFunc) else ""
    return int(name[len(EXTERN):]) if name.startswith(EXTERN) else None
