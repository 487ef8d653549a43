"""Independent NumPy reference for one ABC-Net conv layer, computed in the bit domain.

Tests use it as the oracle between the float formulation (the ONNX graph, see
`abc_conv2d_float`) and the compiled TVM kernels: `abc_conv_dot` must match both bit for
bit. It depends on NumPy only, so it cannot inherit a bug from torch or TVM.

Conventions (docs: DESIGN.md, "Bit-packing conventions"): channels are packed along the
last axis of NHWC tensors, LSB first, channel k*w + j in bit j of word k, pad bits 0.
Activations pack to [N, B, H, W, ceil(C/w)], weight bases to [M, O, kh, kw, ceil(I/w)].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ACTS = ("bipolar", "unipolar")
WORD_DTYPES = {32: np.uint32, 64: np.uint64}

IntPair = int | Sequence[int]

# Byte popcount table, for NumPy < 2.0 where np.bitwise_count does not exist.
_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


# --------------------------------------------------------------------------- packing


def binarize(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bool planes [N, *x.shape]: plane n is float32(x) + float32(v[n]) >= 0.5.

    The sum is rounded to float32 first, exactly as ONNX Runtime runs Add then
    GreaterOrEqual; `x >= 0.5 - v` would round differently near the threshold. The
    optional Clip(0, 1) of the graph does not change the comparison with 0.5.
    """
    x32 = np.asarray(x, dtype=np.float32)
    v32 = np.asarray(v, dtype=np.float32).reshape(-1)
    shifted = x32[None] + v32.reshape((-1,) + (1,) * x32.ndim)  # float32 + float32 -> float32
    assert shifted.dtype == np.float32
    return shifted >= np.float32(0.5)


def pack_bits(bits: np.ndarray, word_bits: int = 64) -> np.ndarray:
    """Pack the last axis (C channels) into ceil(C/w) words; channel k*w + j is bit j of word k.

    Channels past C are 0 bits, so they add nothing to any popcount.
    """
    dtype = _word_dtype(word_bits)
    bits = np.asarray(bits)
    if bits.ndim == 0:
        raise ValueError("pack_bits needs at least one axis (the channel axis)")
    if bits.dtype != np.bool_:
        if not np.all((bits == 0) | (bits == 1)):
            raise ValueError("pack_bits expects bool or 0/1 values")
        bits = bits.astype(np.bool_)
    c = bits.shape[-1]
    n_words = -(-c // word_bits)
    pad = [(0, 0)] * (bits.ndim - 1) + [(0, n_words * word_bits - c)]
    grouped = np.pad(bits, pad).reshape(*bits.shape[:-1], n_words, word_bits).astype(dtype)
    shifts = np.arange(word_bits, dtype=dtype)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(dtype)


def popcount(words: np.ndarray) -> np.ndarray:
    """Per-element number of set bits, as int64, for unsigned words (uint32, uint64)."""
    words = np.asarray(words)
    if words.dtype.kind != "u":
        # np.bitwise_count counts |x| for signed ints, which is not the bit pattern's count.
        raise ValueError(f"popcount expects unsigned words, got {words.dtype}")
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).astype(np.int64)
    return _popcount_table(words)


def _popcount_table(words: np.ndarray) -> np.ndarray:
    """Byte-table popcount: the fallback for NumPy without bitwise_count."""
    words = np.asarray(words)
    as_bytes = np.ascontiguousarray(words).view(np.uint8)
    return _BYTE_POPCOUNT[as_bytes.reshape(*words.shape, words.dtype.itemsize)].sum(axis=-1)


def pack_activations(x: np.ndarray, v: np.ndarray, word_bits: int = 64) -> np.ndarray:
    """x float32 NCHW [B, C, H, W] -> packed NHWC bit-planes I_n: [N, B, H, W, ceil(C/w)]."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D NCHW [B, C, H, W], got shape {x.shape}")
    planes = binarize(x, v)  # [N, B, C, H, W]
    return pack_bits(planes.transpose(0, 1, 3, 4, 2), word_bits)


def pack_weights(bases: np.ndarray, word_bits: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """±1 bases [M, O, I, kh, kw] -> (wbits [M, O, kh, kw, ceil(I/w)], wsum int32 [M, O, kh, kw]).

    A bit is 1 where the base is +1. wsum is the sum of the ±1 values over input channels
    at each tap (= 2 * popcount - I): the bipolar zero-padding correction is built from it.
    """
    bases = _check_bases(bases)
    wbits = pack_bits(bases.transpose(0, 1, 3, 4, 2) == 1, word_bits)
    wsum = 2 * popcount(wbits).sum(axis=-1) - bases.shape[2]
    return wbits, wsum.astype(np.int32)


# ------------------------------------------------------------------------ accumulation


def popcount_accumulate(
    ipk: np.ndarray, wbits: np.ndarray, stride: IntPair = 1, padding: IntPair = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Bit-domain sums over the receptive field, for every (m, n) pair.

    ipk [N, B, H, W, K] and wbits [M, O, kh, kw, K] are packed words. Returns
    t int64 [M, N, B, O, OH, OW] = sum over taps of popcount(I_n & Bbits_m) and
    p int64 [N, B, OH, OW] = sum over taps of popcount(I_n), computed once per n (shared by
    every m and o). Padded taps are zero words, so they add nothing to either sum.
    """
    n, b, h, w, k = ipk.shape
    m, o, kh, kw, kw_words = wbits.shape
    if k != kw_words:
        raise ValueError(f"activation words per pixel ({k}) != weight words per tap ({kw_words})")
    sh, sw = _stride(stride)
    top, left, bottom, right = _pads(padding)
    oh, ow = _out_size((h, w), (kh, kw), (sh, sw), (top, left, bottom, right))
    padded = np.pad(ipk, ((0, 0), (0, 0), (top, bottom), (left, right), (0, 0)))
    t = np.zeros((m, n, b, o, oh, ow), dtype=np.int64)
    p = np.zeros((n, b, oh, ow), dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            tap = padded[:, :, ky : ky + sh * (oh - 1) + 1 : sh, kx : kx + sw * (ow - 1) + 1 : sw]
            p += popcount(tap).sum(axis=-1)
            w_tap = wbits[:, :, ky, kx]  # [M, O, K]
            both = tap[None, :, :, None] & w_tap[:, None, None, :, None, None, :]
            t += popcount(both).sum(axis=-1)
    return t, p


def valid_weight_sum(
    wsum: np.ndarray,
    in_hw: tuple[int, int],
    stride: IntPair = 1,
    padding: IntPair = 0,
) -> np.ndarray:
    """S int64 [M, O, OH, OW]: sum of wsum over the taps that fall inside the input.

    This is Larq's zero-padding correction: the float graph pads A_n with 0, not -1, so
    padded taps must not contribute -B; only in-range taps count. Interior pixels get the
    sum over all taps; border pixels get less.
    """
    _, _, kh, kw = wsum.shape
    h, w = in_hw
    sh, sw = _stride(stride)
    top, left, bottom, right = _pads(padding)
    oh, ow = _out_size((h, w), (kh, kw), (sh, sw), (top, left, bottom, right))
    rows = np.arange(kh)[:, None] + np.arange(oh)[None, :] * sh - top  # input row of tap ky at y
    cols = np.arange(kw)[:, None] + np.arange(ow)[None, :] * sw - left
    valid_y = ((rows >= 0) & (rows < h)).astype(np.int64)  # [kh, OH]
    valid_x = ((cols >= 0) & (cols < w)).astype(np.int64)  # [kw, OW]
    return np.einsum("moij,iy,jx->moyx", wsum.astype(np.int64), valid_y, valid_x)


# -------------------------------------------------------------------- output transform


def dot_from_counts(t: np.ndarray, p: np.ndarray, s: np.ndarray, act: str) -> np.ndarray:
    """Integer dot(A_n, B_m) [M, N, B, O, OH, OW] from t, p and S (see popcount_accumulate).

    unipolar (A = I): dot = t - (p - t) = 2t - p.
    bipolar (A = 2I - 1 on valid taps, 0 on padded ones): dot = 2(2t - p) - S.
    """
    act = _check_act(act)
    unipolar = 2 * t - p[None, :, :, None]
    if act == "unipolar":
        return unipolar
    return 2 * unipolar - s[:, None, None]


def abc_conv_dot(
    x: np.ndarray,
    v: np.ndarray,
    bases: np.ndarray,
    stride: IntPair = 1,
    padding: IntPair = 0,
    act: str = "bipolar",
    word_bits: int = 64,
) -> np.ndarray:
    """int32 [M, N, B, O, OH, OW]: exact dot of every activation plane A_n with every base B_m.

    Computed with AND + popcount on packed words, the way the compiled kernels do it.
    padding is an int, (ph, pw), or ONNX order (top, left, bottom, right); dilation is 1.
    """
    x, v, bases, act = _check_layer(x, v, bases, stride, padding, act)
    ipk = pack_activations(x, v, word_bits)
    wbits, wsum = pack_weights(bases, word_bits)
    t, p = popcount_accumulate(ipk, wbits, stride, padding)
    s = valid_weight_sum(wsum, x.shape[2:], stride, padding)
    return dot_from_counts(t, p, s, act).astype(np.int32)


def abc_conv2d(
    x: np.ndarray,
    v: np.ndarray,
    beta: np.ndarray,
    bases: np.ndarray,
    alpha: np.ndarray,
    stride: IntPair = 1,
    padding: IntPair = 0,
    act: str = "bipolar",
    word_bits: int = 64,
) -> np.ndarray:
    """float32 [B, O, OH, OW] = sum_m sum_n alpha[m, o] * beta[n] * dot[m, n, b, o, y, x].

    alpha is (M,) per layer or (M, O) per output channel; beta is (N,). Float64 accumulation.
    """
    x, v, bases, act = _check_layer(x, v, bases, stride, padding, act)
    m, o = bases.shape[:2]
    alpha64 = _alpha_matrix(alpha, m, o)
    beta64 = _beta_vector(beta, v.size)
    dot = abc_conv_dot(x, v, bases, stride, padding, act, word_bits)
    out = np.einsum("mo,n,mnboyx->boyx", alpha64, beta64, dot.astype(np.float64), optimize=True)
    return out.astype(np.float32)


def abc_conv2d_float(
    x: np.ndarray,
    v: np.ndarray,
    beta: np.ndarray,
    bases: np.ndarray,
    alpha: np.ndarray,
    stride: IntPair = 1,
    padding: IntPair = 0,
    act: str = "bipolar",
) -> np.ndarray:
    """The float formulation, as the ONNX graph computes it: float32 [B, O, OH, OW].

    A_n = binarize (unipolar {0,1} or bipolar {-1,+1}), zero-padded, convolved with the
    float weight W = sum_m alpha_m * B_m, times beta_n, summed over n (float64 inside).
    """
    x, v, bases, act = _check_layer(x, v, bases, stride, padding, act)
    m, o, _, kh, kw = bases.shape
    alpha64 = _alpha_matrix(alpha, m, o)
    beta64 = _beta_vector(beta, v.size)
    sh, sw = _stride(stride)
    top, left, bottom, right = _pads(padding)
    a = binarize(x, v).astype(np.float64)  # [N, B, C, H, W]
    if act == "bipolar":
        a = 2.0 * a - 1.0
    a = np.pad(a, ((0, 0), (0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(a, (kh, kw), axis=(3, 4))
    windows = windows[:, :, :, ::sh, ::sw]  # [N, B, C, OH, OW, kh, kw]
    weight = np.einsum("mo,moikl->oikl", alpha64, bases.astype(np.float64))
    y = np.einsum("nbcyxkl,ockl->nboyx", windows, weight, optimize=True)
    return np.einsum("n,nboyx->boyx", beta64, y).astype(np.float32)


# ------------------------------------------------------------------------- validation


def _word_dtype(word_bits: int) -> type[np.unsignedinteger]:
    if word_bits not in WORD_DTYPES:
        raise ValueError(f"word_bits must be 32 or 64, got {word_bits!r}")
    return WORD_DTYPES[word_bits]


def _check_act(act: str) -> str:
    if act not in ACTS:
        raise ValueError(f"act must be 'bipolar' or 'unipolar', got {act!r}")
    return act


def _check_bases(bases: np.ndarray) -> np.ndarray:
    bases = np.asarray(bases)
    if bases.ndim != 5:
        raise ValueError(f"bases must be 5-D [M, O, I, kh, kw], got shape {bases.shape}")
    if not np.all((bases == 1) | (bases == -1)):
        raise ValueError("bases must hold only +1 and -1 values")
    return bases


def _stride(stride: IntPair) -> tuple[int, int]:
    pair = (stride, stride) if np.isscalar(stride) else tuple(stride)
    if len(pair) != 2 or any(int(s) != s or s < 1 for s in pair):
        raise ValueError(f"stride must be a positive int or (sh, sw), got {stride!r}")
    return int(pair[0]), int(pair[1])


def _pads(padding: IntPair) -> tuple[int, int, int, int]:
    """int, (ph, pw) or ONNX (top, left, bottom, right) -> (top, left, bottom, right)."""
    if np.isscalar(padding):
        pads = (padding,) * 4
    else:
        pads = tuple(padding)
        if len(pads) == 2:
            pads = pads * 2
    if len(pads) != 4 or any(int(p) != p or p < 0 for p in pads):
        raise ValueError(
            f"padding must be a non-negative int, (ph, pw) or (top, left, bottom, right), "
            f"got {padding!r}"
        )
    return int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3])


def _out_size(
    in_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> tuple[int, int]:
    top, left, bottom, right = pads
    oh = (in_hw[0] + top + bottom - kernel[0]) // stride[0] + 1
    ow = (in_hw[1] + left + right - kernel[1]) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"kernel {kernel} does not fit input {tuple(in_hw)} with padding {pads}: "
            f"output would be {oh}x{ow}"
        )
    return oh, ow


def _check_layer(
    x: np.ndarray, v: np.ndarray, bases: np.ndarray, stride: IntPair, padding: IntPair, act: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Validate one layer's inputs; return x as float32, v as float32 (N,), bases and act."""
    act = _check_act(act)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D NCHW [B, C, H, W], got shape {x.shape}")
    v = np.asarray(v, dtype=np.float32)
    if v.ndim > 1 or v.size == 0:
        raise ValueError(f"v must be a non-empty 1-D array of N shifts, got shape {v.shape}")
    v = v.reshape(-1)
    bases = _check_bases(bases)
    m, o, i, kh, kw = bases.shape
    if min(m, o, kh, kw) < 1:
        raise ValueError(f"bases shape {bases.shape} needs M, O, kh, kw >= 1")
    if i != x.shape[1]:
        raise ValueError(f"bases have {i} input channels but x has {x.shape[1]} channels")
    _out_size(x.shape[2:], (kh, kw), _stride(stride), _pads(padding))
    return x, v, bases, act


def _alpha_matrix(alpha: np.ndarray, m: int, o: int) -> np.ndarray:
    """alpha (M,) per layer or (M, O) per channel -> float64 (M, O); trailing 1-axes allowed."""
    a = np.asarray(alpha, dtype=np.float64)
    while a.ndim > 2 and a.shape[-1] == 1:  # (M, 1, 1, 1, 1) / (M, O, 1, 1, 1) as in ONNX
        a = a[..., 0]
    if a.shape == (m,):
        a = a[:, None]
    if a.shape not in ((m, 1), (m, o)):
        raise ValueError(f"alpha must have shape ({m},) or ({m}, {o}), got {np.shape(alpha)}")
    return np.broadcast_to(a, (m, o))


def _beta_vector(beta: np.ndarray, n: int) -> np.ndarray:
    b = np.asarray(beta, dtype=np.float64)
    if b.ndim > 1 or b.size != n:
        raise ValueError(f"beta must have shape ({n},) to match v, got {b.shape}")
    return b.reshape(n)
