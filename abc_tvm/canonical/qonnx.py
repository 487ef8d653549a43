"""QONNX, as Brevitas' `export_qonnx` and FINN write it: each quantizer becomes standard ONNX.

`Quant` (also `IntQuant`), `BipolarQuant` and `Trunc` of the `qonnx.custom_op.general`
domain (FINN's older `finn.custom_op.general` too) are rewritten into the float ops that
compute them, step for step as QONNX's reference executor does (`qonnx.custom_op.general`),
so ONNX Runtime, TVM's importer and the matcher all read the result:

    Quant(x, s, z, b)    q = round_mode(clip(x / s + z, qmin, qmax)); y = (q - z) * s
    BipolarQuant(x, s)   y = where(x >= 0, 1, -1) * s
    Trunc(x, s, z, ...)  y = (round_mode(round(x / s + z) / 2^shift) - z') * s'

Quantizers of constants (weights) then fold in `fold_constants`; those of activations are
the binarizers the matcher reads: `Where(GreaterOrEqual(h, 0), 1, -1)` and
`Mul(Round(Clip(h / s, qmin, qmax)), s)`, a k-level quantizer read as threshold planes.
Nothing here needs the `qonnx` or `brevitas` packages.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from abc_tvm.canonical.graph import Graph
from abc_tvm.canonical.rules import Note
from abc_tvm.errors import UserError

DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general")
STANDARD = ("", "ai.onnx")
MAX_BITS = 64  # wider is no quantizer: a one-line error (float32 rounds the bounds as QONNX does)


def qmin_qmax(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """The integer range of a `Quant` (QONNX's min_int / max_int)."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)


def lower_qonnx(g: Graph) -> list[Note]:
    """Every QONNX node as standard ONNX ops; any other custom op is a one-line error."""
    notes = []
    for node in list(g.nodes):
        if node.domain in STANDARD:
            continue
        if node.domain not in DOMAINS or node.op_type not in _LOWER:
            known = ", ".join(sorted(_LOWER))
            raise UserError(f"node {node.name or node.op_type}: custom op {node.op_type} of "
                            f"domain {node.domain!r} has no lowering (abc-tvm reads standard "
                            f"ONNX and QONNX's {known})")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        g.nodes.remove(node)
        out = _LOWER[node.op_type](g, node, attrs)
        g.replace_uses(node.output[0], out)
        notes.append(Note(_key_op(g, out), "lower_qonnx", f"{node.op_type} as float ops"))
    if notes:
        g.prune()
    return notes


def _key_op(g: Graph, out: str) -> str:
    """The lowered quantizer's step op (Round, Where, ...) below its rescaling, whose name a
    matched block lists, so `inspect` credits the layer with this rule."""
    node = g.producer(out)
    while node is not None and node.op_type in ("Mul", "Sub") and g.producer(node.input[0]):
        node = g.producer(node.input[0])
    return node.name if node is not None else ""


# ------------------------------------------------------------------------------ the ops


def _const_int(g: Graph, node: onnx.NodeProto, value: str, what: str) -> int:
    v = g.scalar(value)
    if v is None or v != int(v) or not 1 <= v <= MAX_BITS:
        raise UserError(f"node {node.name or node.op_type}: {what} must be a constant integer "
                        f"1-{MAX_BITS}, got {g.const(value) if v is None else v}")
    return int(v)


def _f32(g: Graph, value: float, hint: str) -> str:
    return g.add_const(np.array(value, np.float32), hint)


def _op(g: Graph, op: str, inputs: list[str], hint: str, **attrs) -> str:
    return g.add_node(op, inputs, hint, **attrs)[0]


def _is(g: Graph, value: str, number: float) -> bool:
    c = g.const(value)
    return c is not None and bool(np.all(c == number))


def _scale_in(g: Graph, x: str, s: str, z: str | None, hint: str) -> str:
    """x / s + z, leaving out a division by 1 and an addition of 0 (both exact no-ops)."""
    if not _is(g, s, 1.0):
        x = _op(g, "Div", [x, s], hint + ".div")
    if z is not None and not _is(g, z, 0.0):
        x = _op(g, "Add", [x, z], hint + ".zp")
    return x


def _scale_out(g: Graph, q: str, s: str, z: str | None, hint: str) -> str:
    """(q - z) * s, leaving out the no-ops."""
    if z is not None and not _is(g, z, 0.0):
        q = _op(g, "Sub", [q, z], hint + ".unzp")
    if not _is(g, s, 1.0):
        q = _op(g, "Mul", [q, s], hint + ".scale")
    return q


def _bipolar(g: Graph, x: str, hint: str) -> str:
    """where(x >= 0, 1, -1): QONNX's bipolar step (0 maps to +1)."""
    on = _op(g, "GreaterOrEqual", [x, _f32(g, 0.0, hint + ".zero")], hint + ".ge")
    return _op(g, "Where", [on, _f32(g, 1.0, hint + ".one"), _f32(g, -1.0, hint + ".mone")],
               hint + ".sign")


def _round(g: Graph, x: str, mode: str, hint: str) -> str:
    """QONNX's rounding modes (`resolve_rounding_mode`) as ONNX ops, formula for formula."""
    mode = mode.upper()
    if mode in ("ROUND", "HALF_EVEN"):
        return _op(g, "Round", [x], hint + ".round")
    if mode in ("CEIL", "FLOOR"):
        return _op(g, mode.capitalize(), [x], hint + "." + mode.lower())
    signed_mag = {"UP": ("Ceil", 0.0), "DOWN": ("Floor", 0.0), "HALF_UP": ("Floor", 0.5),
                  "HALF_DOWN": ("Ceil", -0.5)}
    if mode not in signed_mag:
        raise UserError(f"{hint}: unknown QONNX rounding mode {mode!r}")
    fn, offset = signed_mag[mode]  # sign(x) * fn(|x| + offset)
    mag = _op(g, "Abs", [x], hint + ".abs")
    if offset:
        mag = _op(g, "Add", [mag, _f32(g, offset, hint + ".half")], hint + ".off")
    return _op(g, "Mul", [_op(g, "Sign", [x], hint + ".sgn"), _op(g, fn, [mag], hint + ".rnd")],
               hint + ".rounded")


def _quant(g: Graph, node: onnx.NodeProto, attrs: dict) -> str:
    x, s, z, b = node.input[:4]
    hint = node.name or "quant"
    bits = _const_int(g, node, b, "bit width")
    signed, narrow = bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0))
    v = _scale_in(g, x, s, z, hint)
    if bits == 1 and signed:  # as QONNX executes it: a signed 1-bit Quant is bipolar
        q = _bipolar(g, v, hint)
    else:
        lo, hi = qmin_qmax(bits, signed, narrow)
        v = _op(g, "Clip", [v, _f32(g, lo, hint + ".lo"), _f32(g, hi, hint + ".hi")],
                hint + ".clip")
        q = _round(g, v, attrs.get("rounding_mode", "ROUND"), hint)
    return _scale_out(g, q, s, z, hint)


def _bipolar_quant(g: Graph, node: onnx.NodeProto, attrs: dict) -> str:
    x, s = node.input[:2]
    hint = node.name or "bipolar_quant"
    q = _bipolar(g, x, hint)
    return q if _is(g, s, 1.0) else _op(g, "Mul", [q, s], hint + ".scale")


def _trunc(g: Graph, node: onnx.NodeProto, attrs: dict) -> str:
    """Trunc v1 (x, s, z, in_bits, out_bits) and v2 (x, s, z, in_bits, out_scale, out_bits)."""
    hint = node.name or "trunc"
    x, s, z = node.input[:3]
    mode = attrs.get("rounding_mode", "FLOOR")
    v = _op(g, "Round", [_scale_in(g, x, s, z, hint)], hint + ".round0")
    if len(node.input) == 5:  # v1: shift by in_bits - out_bits, no clamp
        shift = _const_int(g, node, node.input[3], "input bit width") \
            - _const_int(g, node, node.input[4], "output bit width")
        v = _op(g, "Div", [v, _f32(g, 2.0**shift, hint + ".shift")], hint + ".shifted")
        return _scale_out(g, _round(g, v, mode, hint), s, z, hint)
    out_scale, out_bits = node.input[4], _const_int(g, node, node.input[5], "output bit width")
    ratio = g.const(out_scale) / g.const(s) if g.const(out_scale) is not None \
        and g.const(s) is not None else None
    if ratio is None:
        raise UserError(f"node {hint}: Trunc needs constant scales")
    step = np.float32(2.0) ** np.round(np.log2(np.asarray(ratio, np.float32)))
    v = _op(g, "Div", [v, g.add_const(step, hint + ".step")], hint + ".shifted")
    lo, hi = qmin_qmax(out_bits, bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0)))
    v = _op(g, "Clip", [v, _f32(g, lo, hint + ".lo"), _f32(g, hi, hint + ".hi")], hint + ".clip")
    q = _round(g, v, mode, hint)
    z_out = _op(g, "Div", [z, g.add_const(step, hint + ".zstep")], hint + ".zout")
    return _op(g, "Mul", [_op(g, "Sub", [q, z_out], hint + ".unzp"), out_scale], hint + ".out")


_LOWER = {"Quant": _quant, "IntQuant": _quant, "BipolarQuant": _bipolar_quant, "Trunc": _trunc}
