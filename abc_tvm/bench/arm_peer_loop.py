"""A peer engine's inference loop, run by the *aarch64* Python of the peers' sysroot under
qemu (so it imports nothing from abc-tvm): the cycle model runs it with 0 and R loops and
differences the two (`cycle_model.process_estimate`), so loading, weight transforms and one
warm-up inference cancel and what is left is R steady-state inferences.

    python arm_peer_loop.py ncnn <file.param> <loops>   # as benchncnn: zero weights, 1 thread
    python arm_peer_loop.py ort <model.onnx> <loops>    # ONNX Runtime CPU EP, 1 thread
    python arm_peer_loop.py litert <model.tflite> <loops>  # LiteRT (XNNPACK), 1 thread
"""

from __future__ import annotations

import sys

WARMUP = 1


def ncnn_loop(param: str, loops: int, size: int = 224) -> None:
    """ncnn's benchncnn, step by step: its options, weights from DataReaderFromEmpty (zeros),
    pool allocators, input filled with 0.01, a fresh extractor per inference."""
    import ncnn

    net = ncnn.Net()
    o = net.opt
    o.lightmode = True
    o.num_threads = 1
    blob, work = ncnn.UnlockedPoolAllocator(), ncnn.PoolAllocator()
    o.blob_allocator, o.workspace_allocator = blob, work
    o.use_winograd_convolution = o.use_sgemm_convolution = o.use_int8_inference = True
    o.use_fp16_packed = o.use_fp16_storage = o.use_fp16_arithmetic = True
    o.use_int8_storage = o.use_int8_arithmetic = o.use_packing_layout = True
    if net.load_param(param) != 0 or net.load_model(ncnn.DataReaderFromEmpty()) != 0:
        raise SystemExit(f"ncnn cannot load {param}")
    x = ncnn.Mat(size, size, 3)
    x.fill(0.01)
    for _ in range(WARMUP + loops):
        ex = net.create_extractor()
        ex.input("data", x)
        rc, y = ex.extract("output")
        if rc != 0:
            raise SystemExit(f"ncnn extract failed ({rc})")
        del ex
    print(f"ncnn {ncnn.__version__}: {loops} loops, output {y.w}, "
          f"fp16 arithmetic {'on' if ncnn.cpu_support_arm_asimdhp() else 'off'}", flush=True)
    del y
    net.clear()  # before the allocators it used go
    del net
    blob.clear()
    work.clear()


def ort_loop(model: str, loops: int) -> None:
    """ONNX Runtime's CPU execution provider, 1 intra-op and 1 inter-op thread, all graph
    optimisations (its default), one random input."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    i = sess.get_inputs()[0]
    x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in i.shape],
                                        dtype=np.float32)
    for _ in range(WARMUP + loops):
        y = sess.run(None, {i.name: x})[0]
    print(f"onnxruntime {ort.__version__}: {loops} loops, output {y.shape}", flush=True)


def litert_loop(model: str, loops: int) -> None:
    """LiteRT's interpreter with its default delegate (XNNPACK, fp32 and int8), 1 thread."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=model, num_threads=1)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    x = np.random.default_rng(0).random(i["shape"], dtype=np.float32)
    for _ in range(WARMUP + loops):
        it.set_tensor(i["index"], x)
        it.invoke()
        y = it.get_tensor(o["index"])
    print(f"litert: {loops} loops, output {y.shape}", flush=True)


if __name__ == "__main__":
    engine, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"ncnn": ncnn_loop, "ort": ort_loop, "litert": litert_loop}[engine](path, n)
