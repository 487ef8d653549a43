"""float32 order helpers: exact thresholds of monotone float32 computations.

A binarizer `f(x) >= t` with f a chain of float32 ops that never decreases (adds, positive
scales, clips, rounding) is on exactly for x >= T, T the least float32 where it is on.
Comparing x >= T is then bit for bit what the float graph computes, where the rounded
algebraic threshold (t - v, (j - 0.5) / k, ...) can differ by an ulp at the edge.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_TOP = 0x7F800000  # +inf's bit pattern: the order index of +inf


def least_true_array(on: Callable[[np.ndarray], np.ndarray], n: int) -> np.ndarray:
    """For n predicates at once (one per channel or plane), each false-then-true over the
    float32 order: the least float32 x (-inf and +inf included) where it is true, found by
    bisection over the order index. `on` maps float32 [n] to bool [n]; NaN where never true."""
    lo = np.full(n, -_TOP, np.int64)
    hi = np.full(n, _TOP, np.int64)

    def ev(idx: np.ndarray) -> np.ndarray:
        bits = np.where(idx >= 0, idx, (-idx) | 2**31).astype(np.uint32)
        return np.asarray(on(bits.view(np.float32)), bool)

    never = ~ev(hi)
    always = ev(lo)
    while True:  # invariant where neither: on(hi), not on(lo)
        open_ = (hi - lo > 1) & ~never & ~always
        if not open_.any():
            break
        mid = (lo + hi) // 2
        m = ev(mid)
        hi = np.where(open_ & m, mid, hi)
        lo = np.where(open_ & ~m, mid, lo)
    out = np.where(always, lo, hi)
    bits = np.where(out >= 0, out, (-out) | 2**31).astype(np.uint32)
    result = bits.view(np.float32).copy()
    result[never] = np.nan
    return result
