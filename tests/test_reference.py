"""Tests for the NumPy bit-domain reference (abc_tvm.reference).

The oracle here is a direct integer convolution of the binarised activations with the
±1 bases, written independently of the packing code: if packing, popcount accumulation
or the bipolar border correction is off by one bit, these tests fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from abc_tvm import reference as ref

# ------------------------------------------------------------------------- helpers


def onnx_pads(padding) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), written out independently of the module."""
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        return (padding[0], padding[1], padding[0], padding[1])
    return tuple(padding)


def direct_int_dot(x, v, bases, stride, padding, act) -> np.ndarray:
    """int64 [M, N, B, O, OH, OW] by plain integer convolution of zero-padded A_n with B_m."""
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    top, left, bottom, right = onnx_pads(padding)
    x32 = np.asarray(x, dtype=np.float32)
    planes = [(x32 + np.float32(vn)) >= np.float32(0.5) for vn in np.asarray(v, np.float32)]
    i = np.stack(planes).astype(np.int64)  # [N, B, C, H, W]
    a = 2 * i - 1 if act == "bipolar" else i
    a = np.pad(a, ((0, 0), (0, 0), (0, 0), (top, bottom), (left, right)))  # zero padding
    kh, kw = bases.shape[3:]
    win = sliding_window_view(a, (kh, kw), axis=(3, 4))[:, :, :, ::sh, ::sw]
    return np.einsum("nbcyxkl,mockl->mnboyx", win, bases.astype(np.int64))


def random_layer(rng, b, c, h, w, m, n, o, k):
    x = rng.uniform(-0.5, 1.5, size=(b, c, h, w)).astype(np.float32)
    v = rng.uniform(-0.5, 0.5, size=n).astype(np.float32)
    bases = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(m, o, c, k, k))
    return x, v, bases


def _dot_cases(n_cases: int = 48, seed: int = 1234) -> list[dict]:
    """Seeded mix of the option sets; each value of each option appears in some case."""
    rng = np.random.default_rng(seed)
    options = {
        "m": [1, 2, 3, 5],
        "n": [1, 2, 3, 5],
        "act": ["bipolar", "unipolar"],
        "stride": [1, 2, (2, 1)],
        "padding": [0, 1, 2, (1, 2), (2, 0, 1, 1)],
        "k": [1, 3, 5],
        "c": [1, 63, 64, 65, 70],
        "b": [1, 2],
        "word_bits": [32, 64],
    }
    columns = {}
    for name, values in options.items():
        tiled = [values[i % len(values)] for i in range(n_cases)]
        columns[name] = [tiled[j] for j in rng.permutation(n_cases)]
    cases = [{name: columns[name][i] for name in options} for i in range(n_cases)]
    for index, case in enumerate(cases):
        case["seed"] = seed + index
        top, _, bottom, _ = onnx_pads(case["padding"])
        case["h"] = int(rng.integers(max(1, case["k"] - top - bottom), case["k"] + 5))
        case["w"] = int(rng.integers(max(1, case["k"] - top - bottom), case["k"] + 5))
        case["o"] = int(rng.integers(1, 5))
    return cases


DOT_CASES = _dot_cases()


# ------------------------------------------------------------------------- packing


def test_pack_bits_small_word():
    words = ref.pack_bits(np.array([1, 0, 1], dtype=bool))
    assert words.dtype == np.uint64
    assert words.tolist() == [5]


def test_pack_bits_spills_into_second_word():
    bits = np.zeros(65, dtype=bool)
    bits[64] = True
    bits[63] = True
    bits[0] = True
    words = ref.pack_bits(bits, 64)
    assert words.shape == (2,)
    assert int(words[0]) == (1 << 63) | 1
    assert int(words[1]) == 1  # bit 0 of the second word is channel 64


def test_pack_bits_uint32_and_zero_padding():
    bits = np.ones(70, dtype=bool)
    w32 = ref.pack_bits(bits, 32)
    assert w32.dtype == np.uint32
    assert w32.tolist() == [0xFFFFFFFF, 0xFFFFFFFF, 0b111111]  # channels 64..69, rest 0
    w64 = ref.pack_bits(bits, 64)
    assert w64.tolist() == [0xFFFFFFFFFFFFFFFF, 0b111111]
    assert ref.popcount(w64).sum() == 70 and ref.popcount(w32).sum() == 70


def test_pack_bits_leading_axes_and_int_input():
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=np.int64)
    assert ref.pack_bits(bits, 32).tolist() == [[6], [1]]
    with pytest.raises(ValueError):
        ref.pack_bits(np.array([0, 2, 1]))
    with pytest.raises(ValueError):
        ref.pack_bits(np.array([1, 0]), word_bits=16)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_popcount_matches_python(dtype):
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    words = rng.integers(0, info.max, size=(5, 9), dtype=dtype, endpoint=True)
    words[0, 0] = info.max
    words[0, 1] = 0
    expected = np.array([[bin(int(w)).count("1") for w in row] for row in words])
    got = ref.popcount(words)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(ref._popcount_table(words), expected)  # NumPy < 2 path
    with pytest.raises(ValueError):
        ref.popcount(words.astype(np.int64))


def test_binarize_rounds_in_float32():
    # Exact sum is 0.5 - 2**-27 (< 0.5), within half an ulp of 0.5, so float32 rounds it to 0.5.
    x = np.nextafter(np.float32(0.5), np.float32(0.0))  # 0.5 - 2**-25
    v = np.float32(3 * 2.0**-27)
    assert float(x) + float(v) < 0.5  # float64 would say False
    assert x + v >= np.float32(0.5)  # float32, as ONNX Runtime computes Add
    out = ref.binarize(np.array([x]), np.array([v]))
    assert out.shape == (1, 1) and out.dtype == np.bool_
    assert bool(out[0, 0]) is True


def test_binarize_matches_float32_arithmetic_and_ties():
    x = np.array([0.4, 0.25, 0.5, 0.75, 0.0, 0.49999997], dtype=np.float32)
    v = np.array([0.1, 0.25, -0.25], dtype=np.float32)
    out = ref.binarize(x, v)
    assert out.shape == (3, 6)
    expected = np.stack([(x + vn) >= np.float32(0.5) for vn in v])
    np.testing.assert_array_equal(out, expected)
    assert out[1, 1]  # 0.25 + 0.25 == 0.5 exactly: the tie is True
    assert out[2, 3]  # 0.75 - 0.25 == 0.5 exactly
    assert not out[1, 4]


def test_binarize_random_float32_vs_float64_disagreements_follow_float32():
    rng = np.random.default_rng(3)
    # x + v within a few float32 ulps of 0.5, where float32 and float64 sums can disagree
    x = rng.uniform(0.05, 0.45, size=2000).astype(np.float32)
    v = (0.5 - x.astype(np.float64)).astype(np.float32)
    v = np.nextafter(v, np.float32(0.0))  # nudge down one ulp: exact sum often just below 0.5
    got = np.array([ref.binarize(xi, [vi])[0] for xi, vi in zip(x, v, strict=True)])
    f32 = (x + v) >= np.float32(0.5)
    f64 = (x.astype(np.float64) + v.astype(np.float64)) >= 0.5
    np.testing.assert_array_equal(got, f32)
    assert np.any(f32 != f64), "the construction should contain a float32/float64 disagreement"
    x = rng.normal(0.5, 0.3, size=1000).astype(np.float32)
    np.testing.assert_array_equal(ref.binarize(x, [0.1])[0], (x + np.float32(0.1)) >= 0.5)


@pytest.mark.parametrize("word_bits", [32, 64])
def test_pack_activations_layout(word_bits):
    rng = np.random.default_rng(5)
    x, v, _ = random_layer(rng, b=2, c=70, h=3, w=4, m=1, n=3, o=1, k=1)
    ipk = ref.pack_activations(x, v, word_bits)
    n_words = -(-70 // word_bits)
    assert ipk.shape == (3, 2, 3, 4, n_words)
    planes = ref.binarize(x, v)
    n, b, y, xx, c = 2, 1, 2, 3, 66
    word, bit = divmod(c, word_bits)
    assert bool((int(ipk[n, b, y, xx, word]) >> bit) & 1) == bool(planes[n, b, c, y, xx])
    counts = ref.popcount(ipk).sum(axis=-1)
    np.testing.assert_array_equal(counts, planes.sum(axis=2))


@pytest.mark.parametrize("word_bits", [32, 64])
def test_pack_weights_layout(word_bits):
    rng = np.random.default_rng(6)
    bases = rng.choice([-1.0, 1.0], size=(2, 3, 65, 3, 3))
    wbits, wsum = ref.pack_weights(bases, word_bits)
    assert wbits.shape == (2, 3, 3, 3, -(-65 // word_bits))
    assert wsum.dtype == np.int32 and wsum.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(wsum, bases.sum(axis=2))
    m, o, i, ky, kx = 1, 2, 64, 2, 0
    word, bit = divmod(i, word_bits)
    assert bool((int(wbits[m, o, ky, kx, word]) >> bit) & 1) == (bases[m, o, i, ky, kx] == 1)


@pytest.mark.parametrize("bad", [0.0, 0.5, np.nan, 2.0])
def test_pack_weights_rejects_non_pm1(bad):
    bases = np.ones((1, 1, 3, 1, 1))
    bases[0, 0, 1] = bad
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        ref.pack_weights(bases)


# --------------------------------------------------------------------- the bit domain


def _case_id(case: dict) -> str:
    return "-".join(f"{k}{v}".replace(" ", "") for k, v in case.items() if k != "seed")


@pytest.mark.parametrize("case", DOT_CASES, ids=_case_id)
def test_abc_conv_dot_matches_direct_integer_conv(case):
    rng = np.random.default_rng(case["seed"])
    x, v, bases = random_layer(
        rng, case["b"], case["c"], case["h"], case["w"], case["m"], case["n"], case["o"], case["k"]
    )
    got = ref.abc_conv_dot(
        x, v, bases, case["stride"], case["padding"], case["act"], case["word_bits"]
    )
    expected = direct_int_dot(x, v, bases, case["stride"], case["padding"], case["act"])
    assert got.dtype == np.int32
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_dot_cases_cover_every_option():
    seen = {key: {str(c[key]) for c in DOT_CASES} for key in DOT_CASES[0] if key != "seed"}
    assert seen["m"] == {"1", "2", "3", "5"} and seen["n"] == {"1", "2", "3", "5"}
    assert seen["c"] == {"1", "63", "64", "65", "70"}
    assert seen["k"] == {"1", "3", "5"} and seen["word_bits"] == {"32", "64"}
    assert {"0", "1", "2", "(2, 0, 1, 1)"} <= seen["padding"]
    assert seen["act"] == {"bipolar", "unipolar"} and seen["b"] == {"1", "2"}


def test_output_shape_with_asymmetric_pads_and_stride():
    rng = np.random.default_rng(11)
    x, v, bases = random_layer(rng, b=1, c=5, h=7, w=6, m=2, n=3, o=4, k=3)
    dot = ref.abc_conv_dot(x, v, bases, stride=(2, 1), padding=(0, 2, 1, 0))
    # OH = (7 + 0 + 1 - 3)//2 + 1 = 3, OW = (6 + 2 + 0 - 3)//1 + 1 = 6
    assert dot.shape == (2, 3, 1, 4, 3, 6)


def test_bipolar_border_correction_matters():
    rng = np.random.default_rng(21)
    x, v, _ = random_layer(rng, b=1, c=70, h=6, w=6, m=2, n=2, o=3, k=3)
    bases = np.ones((2, 3, 70, 3, 3))  # every tap sums to +70: padded taps would add a lot
    bases[1, :, :35] = -1.0  # and a base whose taps sum to 0, so not every pair is affected
    bases[0, 1, 3, 0, 0] = -1.0
    stride, padding = 1, 1
    ipk = ref.pack_activations(x, v)
    wbits, wsum = ref.pack_weights(bases)
    t, p = ref.popcount_accumulate(ipk, wbits, stride, padding)
    s_valid = ref.valid_weight_sum(wsum, x.shape[2:], stride, padding)
    s_full = wsum.astype(np.int64).sum(axis=(2, 3))[:, :, None, None]  # all taps, padded too
    naive = 4 * t - 2 * p[None, :, :, None] - s_full[:, None, None]
    dot = ref.abc_conv_dot(x, v, bases, stride, padding, "bipolar")
    expected = direct_int_dot(x, v, bases, stride, padding, "bipolar")
    np.testing.assert_array_equal(dot, expected)
    np.testing.assert_array_equal(ref.dot_from_counts(t, p, s_valid, "bipolar"), expected)
    # interior: identical; border of base 0: the naive formula is wrong
    np.testing.assert_array_equal(naive[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1])
    border = np.ones(expected.shape[-2:], dtype=bool)
    border[1:-1, 1:-1] = False
    assert np.all(naive[0][..., border] != expected[0][..., border])
    # the valid-tap sum itself: a corner sees 4 of 9 taps, an edge 6, the interior 9
    assert s_valid[0, 0, 0, 0] == 4 * 70 and s_valid[0, 0, 0, 2] == 6 * 70
    assert s_valid[0, 0, 2, 2] == 9 * 70


def test_unipolar_needs_no_border_correction():
    rng = np.random.default_rng(22)
    x, v, bases = random_layer(rng, b=2, c=9, h=5, w=5, m=2, n=2, o=2, k=3)
    ipk = ref.pack_activations(x, v, 32)
    wbits, _ = ref.pack_weights(bases, 32)
    t, p = ref.popcount_accumulate(ipk, wbits, 1, 2)
    np.testing.assert_array_equal(
        2 * t - p[None, :, :, None], direct_int_dot(x, v, bases, 1, 2, "unipolar")
    )


# ------------------------------------------------------------------ float formulation


@pytest.mark.parametrize("act", ["bipolar", "unipolar"])
@pytest.mark.parametrize("alpha_kind", ["layer", "channel", "onnx"])
@pytest.mark.parametrize(
    ("stride", "padding", "word_bits"), [(1, 1, 64), (2, (1, 0, 2, 1), 32), ((1, 2), 0, 64)]
)
def test_abc_conv2d_matches_float_formulation(act, alpha_kind, stride, padding, word_bits):
    rng = np.random.default_rng(31)
    m, n, o = 3, 2, 5
    x, v, bases = random_layer(rng, b=2, c=67, h=8, w=7, m=m, n=n, o=o, k=3)
    beta = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
    if alpha_kind == "layer":
        alpha = rng.uniform(0.1, 1.0, size=m).astype(np.float32)
    elif alpha_kind == "channel":
        alpha = rng.uniform(0.1, 1.0, size=(m, o)).astype(np.float32)
    else:  # ONNX constant shape (M, O, 1, 1, 1)
        alpha = rng.uniform(0.1, 1.0, size=(m, o, 1, 1, 1)).astype(np.float32)
    got = ref.abc_conv2d(x, v, beta, bases, alpha, stride, padding, act, word_bits)
    want = ref.abc_conv2d_float(x, v, beta, bases, alpha, stride, padding, act)
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and both equal the integer oracle weighted by hand
    dot = direct_int_dot(x, v, bases, stride, padding, act).astype(np.float64)
    a = np.broadcast_to(np.asarray(alpha, np.float64).reshape(m, -1), (m, o))
    by_hand = np.einsum("mo,n,mnboyx->boyx", a, beta.astype(np.float64), dot)
    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-5)


def test_float_and_bit_domain_layerwise_equals_channelwise_constant():
    rng = np.random.default_rng(32)
    x, v, bases = random_layer(rng, b=1, c=4, h=5, w=5, m=2, n=2, o=3, k=3)
    beta = np.array([0.5, 1.5], dtype=np.float32)
    alpha = np.array([0.25, 0.75], dtype=np.float32)
    per_layer = ref.abc_conv2d(x, v, beta, bases, alpha, padding=1)
    per_chan = ref.abc_conv2d(x, v, beta, bases, np.repeat(alpha[:, None], 3, axis=1), padding=1)
    np.testing.assert_array_equal(per_layer, per_chan)


# ------------------------------------------------------------------------- validation


def _layer():
    rng = np.random.default_rng(41)
    x, v, bases = random_layer(rng, b=1, c=4, h=5, w=5, m=2, n=2, o=3, k=3)
    return x, v, bases, np.ones(2, np.float32), np.ones(2, np.float32)


def test_rejects_non_pm1_bases():
    x, v, bases, beta, alpha = _layer()
    bases[0, 0, 0, 0, 0] = 0.0
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        ref.abc_conv_dot(x, v, bases)
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        ref.abc_conv2d_float(x, v, beta, bases, alpha)


@pytest.mark.parametrize("act", ["sign", "Bipolar", "", None])
def test_rejects_bad_act(act):
    x, v, bases, beta, alpha = _layer()
    with pytest.raises(ValueError, match="act"):
        ref.abc_conv_dot(x, v, bases, act=act)
    with pytest.raises(ValueError, match="act"):
        ref.abc_conv2d(x, v, beta, bases, alpha, act=act)
    with pytest.raises(ValueError, match="act"):
        ref.abc_conv2d_float(x, v, beta, bases, alpha, act=act)


def test_rejects_mismatched_channels():
    x, v, bases, beta, alpha = _layer()
    with pytest.raises(ValueError, match="channels"):
        ref.abc_conv_dot(x[:, :3], v, bases)
    with pytest.raises(ValueError, match="channels"):
        ref.abc_conv2d_float(x, v, beta, bases[:, :, :2], alpha)


@pytest.mark.parametrize("shape", [(4, 5, 5), (1, 1, 4, 5, 5), (20,)])
def test_rejects_non_4d_x(shape):
    _, v, bases, beta, alpha = _layer()
    x = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ValueError, match="4-D"):
        ref.abc_conv_dot(x, v, bases)
    with pytest.raises(ValueError, match="4-D"):
        ref.abc_conv2d(x, v, beta, bases, alpha)
    with pytest.raises(ValueError, match="4-D"):
        ref.pack_activations(x, v)


def test_rejects_other_bad_arguments():
    x, v, bases, beta, alpha = _layer()
    with pytest.raises(ValueError, match="beta"):
        ref.abc_conv2d(x, v, np.ones(3), bases, alpha)
    with pytest.raises(ValueError, match="alpha"):
        ref.abc_conv2d(x, v, beta, bases, np.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        ref.abc_conv2d_float(x, v, beta, bases, np.ones((2, 4)))
    with pytest.raises(ValueError, match="word_bits"):
        ref.abc_conv_dot(x, v, bases, word_bits=8)
    with pytest.raises(ValueError, match="padding"):
        ref.abc_conv_dot(x, v, bases, padding=(1, 1, 1))
    with pytest.raises(ValueError, match="padding"):
        ref.abc_conv_dot(x, v, bases, padding=-1)
    with pytest.raises(ValueError, match="stride"):
        ref.abc_conv_dot(x, v, bases, stride=0)
    with pytest.raises(ValueError, match="does not fit"):
        ref.abc_conv_dot(x[:, :, :2], v, bases)
    with pytest.raises(ValueError, match="v must be"):
        ref.abc_conv_dot(x, np.zeros((2, 2)), bases)
    with pytest.raises(ValueError, match="5-D"):
        ref.abc_conv_dot(x, v, bases[0])
