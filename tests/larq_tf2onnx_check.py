"""Checks tests/larq_nets.py against real tf2onnx exports (not part of the suite: it needs
TensorFlow). Run by hand in a Python 3.11 environment with tensorflow-cpu 2.15, larq 0.14,
tf2onnx 1.17, numpy 1.26, protobuf 3.20 and onnx:

    python tests/larq_tf2onnx_check.py

It builds a Keras/Larq mirror of each net in tests/test_larq.py, exports it with
`tf2onnx.convert.from_keras(opset=13)`, and compares the two graphs node by node: op type,
attributes, constant shapes (and small constants' values) and producers three levels deep,
as multisets (names and node order aside). Prints 'all identical: True' when the generator
writes what tf2onnx writes. Result recorded in docs/onnx-contract.md.
"""
# ruff: noqa: E501, E401, E702, N806
import collections
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import larq as lq
import numpy as np
import tensorflow as tf
import tf2onnx
from larq_nets import LarqNet
from onnx import helper, numpy_helper

K = tf.keras.layers
Q = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)

def export(m, batch):
    spec = (tf.TensorSpec((batch, *m.input_shape[1:]), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(m, input_signature=spec, opset=13)
    return proto

def signature(m):
    consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    prod = {o: n for n in m.graph.node for o in n.output}
    def const_desc(c):
        if c.size <= 8 and c.dtype != np.float32 or c.size == 1:
            return f"C{list(c.shape)}={np.round(c.reshape(-1), 4).tolist()}"
        return f"C{list(c.shape)}"
    def sig(v, depth):
        if v in consts:
            return const_desc(consts[v])
        n = prod.get(v)
        if n is None:
            return "IN"
        if depth == 0:
            return n.op_type
        attrs = sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute if a.name != "epsilon")
        return f"{n.op_type}{attrs}(" + ",".join(sig(i, depth - 1) for i in n.input) + ")"
    return collections.Counter(sig(n.output[0], 3) for n in m.graph.node if n.op_type != "Constant")

def compare(name, real, gen):
    a, b = signature(real), signature(gen)
    ok = a == b
    print(f"{name}: {sum(a.values())} real nodes, {sum(b.values())} generated, identical structure: {ok}")
    if not ok:
        for s in a - b:
            print("   only real:", s[:300])
        for s in b - a:
            print("   only gen: ", s[:300])
    return ok

def nets():
    # A: tests/test_larq.py::test_birealnet_style_net_is_binary_and_matches_ort
    inp = tf.keras.Input((16, 16, 3)); x = K.BatchNormalization()(K.Conv2D(32, 3, padding="same", use_bias=False)(inp))
    for _ in range(2):
        x = K.add([K.BatchNormalization()(lq.layers.QuantConv2D(32, 3, padding="same", **Q)(x)), x])
    x = K.MaxPool2D(2)(x)
    x = K.BatchNormalization()(lq.layers.QuantConv2D(64, 3, strides=2, padding="same", **Q)(x))
    x = lq.layers.QuantDense(10, **Q)(K.GlobalAveragePooling2D()(x))
    net = LarqNet(batch=2, size=16, channels=3, seed=1)
    y = net.maxpool(net.birealnet_block(net.birealnet_block(net.conv(net.x, 32))))
    yield "birealnet-style", tf.keras.Model(inp, x), 2, net.model(net.quant_dense(net.quant_conv(y, 64, stride=2), 10))
    # B: test_quicknet_pad_one_is_a_plus_one_border
    inp = tf.keras.Input((12, 12, 3)); x = K.BatchNormalization()(K.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(inp))
    for _ in range(2):
        y = lq.layers.QuantConv2D(32, 3, padding="same", pad_values=1.0, **Q)(x)
        x = K.add([K.BatchNormalization()(K.ReLU()(y)), x])
    net = LarqNet(batch=1, size=12, channels=3, seed=2)
    yield "quicknet-style", tf.keras.Model(inp, x), 1, net.model(net.quicknet_block(net.quicknet_block(net.conv(net.x, 32, stride=2))))
    # C: test_fc_like_convs_between_reshapes_are_binary (AlexNet flatten, XNOR 1x1 map)
    inp = tf.keras.Input((4, 4, 3)); x = K.MaxPool2D(2)(K.BatchNormalization()(K.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
    x = K.Reshape((1, 1, -1))(x)
    x = K.BatchNormalization()(lq.layers.QuantConv2D(64, 1, **Q)(x))
    x = K.BatchNormalization()(lq.layers.QuantConv2D(64, 1, **{**Q, "kernel_quantizer": "magnitude_aware_sign"})(x))
    x = lq.layers.QuantDense(10, **Q)(K.GlobalAveragePooling2D()(x))
    net = LarqNet(batch=1, size=4, channels=3, seed=4)
    y = net.bn(net.flatten_fc_conv(net.maxpool(net.conv(net.x, 16)), 64))
    yield "fc-style", tf.keras.Model(inp, x), 1, net.model(net.quant_dense(net.bn(net.fc_conv(y, 64)), 10))
    # D: test_dorefa_two_bit_activation_is_bounded_by_its_clip
    D = dict(input_quantizer=lq.quantizers.DoReFa(k_bit=2, mode="activations"), kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    inp = tf.keras.Input((8, 8, 3)); x = K.BatchNormalization()(K.Conv2D(16, 3, padding="same", use_bias=False)(inp))
    x = K.BatchNormalization()(lq.layers.QuantConv2D(32, 3, padding="same", **D)(x))
    x = K.BatchNormalization()(lq.layers.QuantConv2D(32, 3, padding="same", **D)(x))
    x = K.MaxPool2D(2)(x)
    net = LarqNet(batch=1, size=8, channels=3, seed=5)
    yield "dorefa-style", tf.keras.Model(inp, x), 1, net.model(net.maxpool(net.dorefa_conv(net.dorefa_conv(net.conv(net.x, 16), 32), 32)))

results = [compare(name, export(m, b), gen) for name, m, b, gen in nets()]
print("all identical:", all(results))
