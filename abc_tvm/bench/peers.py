"""The engines a user would pick for a float network today, as bench peers: ONNX Runtime fp32
and int8 (static QDQ), and OpenVINO (its default precision, and int8 from the same QDQ model).

A binary network is only worth it where it beats these: on CPUs with a matrix engine (AMX)
or VNNI an int8 ResNet-18 runs faster than a binary one at far higher accuracy, and the
bench has to say so (docs/benchmarks.md). Each builder returns a callable that runs one
inference, or raises; the caller records the error as the peer's row. OpenVINO is optional
(the dev extra installs it); its absence is a row that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_INPUTS = 8  # static QDQ: activation ranges from this many inputs

PEERS = {
    "ort_int8": "ONNX Runtime int8 (static QDQ, per-channel, u8/s8)",
    "openvino": "OpenVINO default precision",
    "openvino_int8": "OpenVINO int8 (from the QDQ model)",
}


def calibration_inputs(x: np.ndarray, count: int = CALIBRATION_INPUTS) -> list[np.ndarray]:
    """A few inputs like `x` (the bench's input is random): x itself and jittered copies."""
    rng = np.random.default_rng(0)
    return [x] + [np.clip(x + rng.normal(0, 0.1, x.shape), x.min(), x.max()).astype(x.dtype)
                  for _ in range(count - 1)]


def quantize_qdq(onnx_path: str | Path, x: np.ndarray, out: str | Path) -> Path:
    """The float model quantized by ONNX Runtime's static QDQ quantizer (per-channel s8
    weights, u8 activations, MinMax calibration): the int8 model ORT and OpenVINO both run.
    Cached: an existing `out` is reused."""
    out = Path(out)
    if out.is_file():
        return out
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]) \
        .get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: a} for a in calibration_inputs(x)])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    prep = out.with_suffix(".prep.onnx")
    quant_pre_process(str(onnx_path), str(prep), skip_symbolic_shape=True)
    quantize_static(str(prep), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    prep.unlink(missing_ok=True)
    return out


def ort_runner(onnx_path: str | Path, x: np.ndarray, threads: int) -> Callable[[], Any]:
    """ONNX Runtime on one thread pool of `threads`, sequential, every graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)[0]


def openvino_runner(onnx_path: str | Path, x: np.ndarray,
                    threads: int) -> tuple[Callable[[], Any], str]:
    """OpenVINO's CPU plugin at its default precision (bf16 on AMX CPUs, fp32 elsewhere; a
    QDQ model runs int8), latency hint, `threads` threads; and the precision it chose."""
    try:
        import openvino as ov
    except ImportError as e:
        raise RuntimeError("openvino is not installed (pip install -e '.[dev]' installs "
                           "it)") from e
    core = ov.Core()
    compiled = core.compile_model(str(onnx_path), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1})
    request = compiled.create_infer_request()
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def run() -> Any:
        return request.infer([x])[0]

    return run, precision


def matrix_features(flags: frozenset[str]) -> str:
    """The CPU's int8/bf16 matrix features in a phrase, for the machine record."""
    found = [name for flag, name in (("amx_tile", "AMX"), ("amx_int8", "AMX-INT8"),
                                     ("amx_bf16", "AMX-BF16"), ("avx512_vnni", "AVX-512 VNNI"),
                                     ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX-512 BF16"))
             if flag in flags]
    return ", ".join(found) or "none"
