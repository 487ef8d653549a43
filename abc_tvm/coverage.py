"""Which convs look binary, and whether each became a binary kernel.

A user whose binary network silently compiles to float convs gets a model that is correct
and slow; CI pipelines want that to fail. A conv "looks binary" when its data input is a
binarizer's output (a Sign or a threshold comparison, possibly behind layout ops or the
affine steps of a quantizer) or its weight is computed by a Sign. That is a hint, not a
match: the matcher decides what is binary, this only says which float convs a user would
have expected to be binary.
"""

from __future__ import annotations

from dataclasses import dataclass

from abc_tvm import pattern
from abc_tvm.errors import UserError

# a Round is not among them: an 8-bit input quantizer (FINN's CNV) is not a binarizer
_BINARIZERS = {"Sign", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "BipolarQuant"}
# ops a binarizer's output passes through on its way to the conv (layout, padding, the
# affine steps of a quantizer's output, a dtype change)
_THROUGH = {"Transpose", "Reshape", "Pad", "Identity", "Cast", "Mul", "Add", "Sub", "Div",
            "Where", "Clip", "Squeeze", "Unsqueeze", "Flatten"}
_DEPTH = 6


def _from_binarizer(g: pattern.Graph, value: str) -> bool:
    """Whether `value` comes from a binarizer within a few layout or affine steps."""
    frontier, seen = [value], set()
    for _ in range(_DEPTH):
        nxt = []
        for v in frontier:
            op = g.producer(v)
            if op is None or op.name in seen:
                continue
            seen.add(op.name)
            if op.op in _BINARIZERS or (op.op == "Quant" and _one_bit(g, op)):
                return True
            if op.op in _THROUGH:
                nxt += [i for i in op.inputs if i and g.const(i) is None]
        frontier = nxt
    return False


def _one_bit(g: pattern.Graph, op: pattern.Op) -> bool:
    """A QONNX Quant of bit width ≤ 2 (its fourth input) counts as a binarizer."""
    bits = g.scalar(op.inputs[3]) if len(op.inputs) > 3 else None
    return bits is not None and bits <= 2


def binary_looking(g: pattern.Graph) -> list[str]:
    """Names of the convs (and MatMul/Gemm dense layers) whose input or weight is binarized."""
    names = []
    for op in g.ops:
        if op.op not in ("Conv", "MatMul", "Gemm") or len(op.inputs) < 2:
            continue
        if _from_binarizer(g, op.inputs[0]) or _from_binarizer(g, op.inputs[1]):
            names.append(op.name)
    return names


@dataclass
class Coverage:
    """Binary-looking layers and the ones among them that stay float, with the reason."""

    looking: list[str]
    float_: list[tuple[str, str]]  # (layer, reason)

    def warning(self) -> str | None:
        """One line for stderr when some binary-looking layer stays float, else None."""
        if not self.float_:
            return None
        name, reason = self.float_[0]
        share = ("none" if len(self.float_) == len(self.looking)
                 else f"{len(self.looking) - len(self.float_)}")
        return (f"{len(self.float_)} of {len(self.looking)} layers that look binary stay float "
                f"({share} became binary kernels); first: {name}: {reason}")

    def require(self) -> None:
        """--require-binary: a binary-looking layer left float is an error (exit 2)."""
        if self.float_:
            name, reason = self.float_[0]
            more = f" (and {len(self.float_) - 1} more)" if len(self.float_) > 1 else ""
            raise UserError(f"--require-binary: layer {name} looks binary but stays float: "
                            f"{reason}{more}")


def coverage(g: pattern.Graph, float_ops: list[dict]) -> Coverage:
    """Match the binary-looking layers against the report's float ops (name, reason)."""
    looking = binary_looking(g)
    reasons = {f["name"]: f["reason"] for f in float_ops}
    return Coverage(looking, [(n, reasons[n]) for n in looking if n in reasons])
