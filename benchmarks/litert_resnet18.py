"""ResNet-18 as TFLite models for the LiteRT (XNNPACK) rows of the ARM cycle model's peers.

Runs in the TensorFlow environment (`.venv-larq`, see `make litert-models`):

    .venv-larq/bin/python benchmarks/litert_resnet18.py --out out/litert

Writes `resnet18_fp32.tflite` and `resnet18_int8.tflite`: a Keras ResNet-18 (7×7 stem,
four stages of two basic blocks, projection shortcuts where the shape changes, global
average pool, 1000-way dense) with random weights, converted by TFLiteConverter; int8 is
its full-integer post-training quantization (per-channel int8 weights, int8 activations,
float input and output) calibrated on 8 random inputs, what LiteRT runs on XNNPACK's int8
path.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def resnet18(size: int = 224):  # noqa: ANN201 - a Keras model
    import tensorflow as tf

    L = tf.keras.layers  # noqa: N806

    def block(x, filters: int, stride: int):  # noqa: ANN001, ANN202
        y = L.Conv2D(filters, 3, stride, padding="same", use_bias=False)(x)
        y = L.ReLU()(L.BatchNormalization()(y))
        y = L.BatchNormalization()(L.Conv2D(filters, 3, padding="same", use_bias=False)(y))
        if stride != 1 or x.shape[-1] != filters:
            x = L.BatchNormalization()(L.Conv2D(filters, 1, stride, use_bias=False)(x))
        return L.ReLU()(L.Add()([x, y]))

    inp = L.Input((size, size, 3), batch_size=1)
    x = L.Conv2D(64, 7, 2, padding="same", use_bias=False)(inp)
    x = L.MaxPool2D(3, 2, padding="same")(L.ReLU()(L.BatchNormalization()(x)))
    for i, filters in enumerate((64, 128, 256, 512)):
        x = block(x, filters, 1 if i == 0 else 2)
        x = block(x, filters, 1)
    x = L.Dense(1000)(L.GlobalAveragePooling2D()(x))
    return tf.keras.Model(inp, L.Softmax()(x))


def convert(out: Path, size: int = 224) -> list[Path]:
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = resnet18(size)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("fp32", "int8"):
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if name == "int8":
            calib = [np.random.default_rng(i).random((1, size, size, 3), dtype=np.float32)
                     for i in range(8)]
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda calib=calib: ([x] for x in calib)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        path = out / f"resnet18_{name}.tflite"
        path.write_bytes(conv.convert())
        paths.append(path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
    return paths


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/litert"))
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args()
    convert(a.out, a.size)
