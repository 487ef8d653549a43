"""Shared fixtures: ONNX Runtime as the reference, and the relative-error measure of the suite."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, settings


def _ort_run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # tests run two at a time (pytest -n 2)
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, np.float32)})[0]


def _max_rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    """max |y − ref| / max |ref|: the error relative to the output's scale.

    Element-wise relative error is meaningless where the reference is ~0; the outputs here
    are sums of ±β·α products, so their scale is the right yardstick.
    """
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    scale = float(np.abs(ref).max())
    assert scale > 0, "reference output is all zeros: the comparison would prove nothing"
    return float(np.abs(y - ref).max()) / scale


@pytest.fixture(scope="session")
def ort_run() -> Callable[[onnx.ModelProto | str, np.ndarray], np.ndarray]:
    """`ort_run(model_or_path, x)`: the first output of ONNX Runtime (CPU) for input x."""
    return _ort_run


@pytest.fixture(scope="session")
def max_rel_err() -> Callable[[np.ndarray, np.ndarray], float]:
    """`max_rel_err(y, ref)` = max |y − ref| / max |ref| (shapes must match)."""
    return _max_rel_err


# The hypothesis sweeps (tests/test_forms.py): a fixed, derandomised set in CI; more locally.
settings.register_profile("ci", max_examples=16, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture],
                          print_blob=True)
settings.register_profile("local", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("ABC_TVM_HYPOTHESIS", "ci"))
