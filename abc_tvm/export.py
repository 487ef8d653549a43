"""Export PyTorch ABC models to standard ONNX in the canonical ABC pattern of DESIGN.md."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from abc_tvm import pattern
from abc_tvm.nn import ABCConv2d, abc_layers

OPSET = 17


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn Constant nodes, and Identity/Cast of constants, into initializers.

    The TorchScript exporter writes scalars as Constant nodes and casts Clip bounds at run
    time; as initializers they read as the scalar constants the pattern contract names.
    """
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    keep = []
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
        elif node.op_type in ("Identity", "Cast") and node.input[0] in consts:
            val = consts[node.input[0]]
            if node.op_type == "Cast":
                val = val.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
            consts[node.output[0]] = np.asarray(val)
        else:
            keep.append(node)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(
        numpy_helper.from_array(np.asarray(v), name) for name, v in consts.items() if name in used
    )
    return model


def _unfold_weights(model: onnx.ModelProto, stacked: list) -> None:
    """Write each ABC conv weight as ReduceSum(Mul(α, B), axes=[0]), the canonical form.

    The tracer folds the frozen weight into one constant; the layer it came from is found by
    bit-exact equality with that layer's Σ α_m B_m, and the stacked form is put back.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes = []
    done: set[str] = set()  # layers already written (their N convs share one weight)
    for node in g.node:
        if node.op_type == "Conv" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            for name, fz, folded in stacked:
                if w.shape == folded.shape and np.array_equal(w, folded):
                    prefix = f"{name}.abc"
                    node.input[1] = f"{prefix}.weight"
                    if name in done:
                        break
                    done.add(name)
                    bases = fz.bases.numpy()
                    alpha = fz.alpha.numpy().reshape(*fz.alpha.shape, *[1] * (5 - fz.alpha.dim()))
                    g.initializer.extend([
                        numpy_helper.from_array(bases, f"{prefix}.bases"),
                        numpy_helper.from_array(alpha, f"{prefix}.alpha"),
                        numpy_helper.from_array(np.array([0], np.int64), f"{prefix}.axes"),
                    ])
                    new_nodes += [
                        onnx.helper.make_node("Mul", [f"{prefix}.alpha", f"{prefix}.bases"],
                                              [f"{prefix}.scaled"], name=f"{prefix}.Mul"),
                        onnx.helper.make_node("ReduceSum", [f"{prefix}.scaled", f"{prefix}.axes"],
                                              [f"{prefix}.weight"], keepdims=0,
                                              name=f"{prefix}.ReduceSum"),
                    ]
                    break
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def to_onnx(
    model: torch.nn.Module, example_input: torch.Tensor, path: str | os.PathLike | None = None
) -> onnx.ModelProto:
    """Export `model` (in eval mode) to ONNX opset 17 and check it; write it to `path` if given.

    The graph holds one canonical ABC block per `ABCConv2d`; everything else is standard
    ONNX. Raises ValueError for a model without ABC layers or a non-4-D example input.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        shape = tuple(getattr(example_input, "shape", ()))
        raise ValueError(f"example_input must be a 4-D NCHW tensor (got shape {shape})")
    convs = [m for _, m in abc_layers(model) if isinstance(m, ABCConv2d)]
    if not convs:
        raise ValueError("the model has no ABCConv2d layers: nothing for abc-tvm to binarise")
    was_training = model.training
    model.eval()
    try:
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example_input,), buf, dynamo=False, opset_version=OPSET,
                do_constant_folding=False, input_names=["input"], output_names=["output"],
            )
        stacked = [(name, layer.frozen(), layer._eval_weight().numpy())
                   for name, layer in abc_layers(model) if isinstance(layer, ABCConv2d)]
    finally:
        model.train(was_training)
    proto = _fold_constants(onnx.load_from_string(buf.getvalue()))
    _unfold_weights(proto, stacked)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    blocks = pattern.check_canonical(proto)
    if len(blocks) != len(convs):
        raise RuntimeError(
            f"exported graph has {len(blocks)} ABC blocks for {len(convs)} ABCConv2d layers"
        )
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto
