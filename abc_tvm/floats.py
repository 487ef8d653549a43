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


def ordered(x: np.float32) -> int:
    """float32 -> int, order-preserving (both zeros map to 0)."""
    bits = int(np.asarray(x, np.float32).view(np.uint32))
    return bits if bits < 2**31 else -(bits - 2**31)


def unordered(i: int) -> np.float32:
    bits = i if i >= 0 else (-i) | 2**31
    return np.array([bits], np.uint32).view(np.float32)[0]


def least_true(on: Callable[[np.float32], bool], guess: np.float32 | None = None
               ) -> np.float32 | None:
    """The least float32 x (-inf and +inf included) with on(x), for `on` false-then-true over
    the float32 order; None if `on` is never true. Bisection over the order index, started
    near `guess` (a few steps when the guess is the rounded algebraic threshold)."""
    if not on(unordered(_TOP)):
        return None
    if on(unordered(-_TOP)):
        return unordered(-_TOP)
    start = ordered(np.float32(0.0 if guess is None or not np.isfinite(guess) else guess))
    hi, step = start, 1
    while not on(unordered(hi)):  # an index at or above the threshold
        hi, step = min(start + step, _TOP), step * 2
    lo, step = hi - 1, 1
    while on(unordered(lo)):  # an index below it
        lo, step = max(hi - step, -_TOP), step * 2
    while hi - lo > 1:  # on(hi) and not on(lo)
        mid = (lo + hi) // 2
        hi, lo = (mid, lo) if on(unordered(mid)) else (hi, mid)
    return unordered(hi)


def least_true_array(on: Callable[[np.ndarray], np.ndarray], n: int) -> np.ndarray:
    """`least_true` for n independent predicates at once (one per channel): `on` maps a
    float32 array [n] to bool [n]. Entries never true are +inf's successor: NaN."""
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
