"""Mutations of an ONNX model for the front-door fuzzer (benchmarks/fuzz_front_door.py).

Each mutation takes a model (modified in place), a NumPy generator and the case directory
(where external data goes), and returns a one-line description of what it did; it raises
`Skip` when the model has nothing it could change. They imitate what goes wrong with real
files: an exporter's bug (a dropped or duplicated node, a rewired input, an attribute out of
range, a wrong dtype), a file cut short or bit-flipped on its way, weights gone NaN in
training, a hand edit (duplicate names, an unknown domain, the wrong opset).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Skip(Exception):
    """The mutation does not apply to this model."""


Mutation = Callable[[onnx.ModelProto, np.random.Generator, Path], str]


def _pick(rng: np.random.Generator, items: list):
    if not items:
        raise Skip
    return items[int(rng.integers(len(items)))]


def _node(m: onnx.ModelProto, rng, ops: tuple[str, ...] | None = None) -> onnx.NodeProto:
    return _pick(rng, [n for n in m.graph.node if ops is None or n.op_type in ops])


def _label(n: onnx.NodeProto) -> str:
    return f"{n.op_type} {n.name or n.output[0]!r}"


def _values(m: onnx.ModelProto) -> list[str]:
    names = [i.name for i in m.graph.input] + [t.name for t in m.graph.initializer]
    return names + [o for n in m.graph.node for o in n.output if o]


def _tensor_init(m: onnx.ModelProto, rng, min_size: int = 1) -> onnx.TensorProto:
    return _pick(rng, [t for t in m.graph.initializer
                       if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= min_size])


# -- graph structure ------------------------------------------------------------------------

def drop_node(m, rng, d) -> str:
    n = _node(m, rng)
    m.graph.node.remove(n)
    return f"dropped {_label(n)}"


def bypass_node(m, rng, d) -> str:
    """Remove a node and feed its consumers its first input (shapes may no longer fit)."""
    n = _pick(rng, [n for n in m.graph.node if n.input and n.input[0] and n.output])
    src, out = n.input[0], n.output[0]
    m.graph.node.remove(n)
    for other in m.graph.node:
        for k, name in enumerate(other.input):
            if name == out:
                other.input[k] = src
    for o in m.graph.output:
        if o.name == out:
            o.name = src
    return f"bypassed {_label(n)}"


def duplicate_node(m, rng, d) -> str:
    n = _node(m, rng)
    twin = copy.deepcopy(n)
    if rng.random() < 0.5:  # same outputs: two producers of one value
        m.graph.node.insert(list(m.graph.node).index(n) + 1, twin)
        return f"duplicated {_label(n)} (same outputs)"
    twin.name = (n.name or n.op_type) + "_dup"
    for k, o in enumerate(twin.output):
        twin.output[k] = o + "_dup" if o else o
    m.graph.node.append(twin)
    return f"duplicated {_label(n)} (a dead copy)"


def rewire_input(m, rng, d) -> str:
    n = _pick(rng, [n for n in m.graph.node if n.input])
    k = int(rng.integers(len(n.input)))
    new = _pick(rng, _values(m))
    old, n.input[k] = n.input[k], new
    return f"{_label(n)} input {k}: {old!r} -> {new!r}"


def make_cycle(m, rng, d) -> str:
    nodes = list(m.graph.node)
    if len(nodes) < 2:
        raise Skip
    i, j = sorted(rng.choice(len(nodes), 2, replace=False))
    early, late = nodes[i], nodes[j]
    if not early.input or not late.output:
        raise Skip
    early.input[0] = late.output[0]
    return f"cycle: {_label(early)} reads {late.output[0]!r} of a later node"


def swap_order(m, rng, d) -> str:
    nodes = list(m.graph.node)
    if len(nodes) < 2:
        raise Skip
    i, j = rng.choice(len(nodes), 2, replace=False)
    a, b = copy.deepcopy(nodes[i]), copy.deepcopy(nodes[j])
    m.graph.node[i].CopyFrom(b)
    m.graph.node[j].CopyFrom(a)
    return f"swapped nodes {i} and {j} (not topological)"


def dangling_output(m, rng, d) -> str:
    choice = rng.integers(3)
    if choice == 0:
        m.graph.output[0].name = "nowhere"
        return "graph output renamed to an unknown value"
    if choice == 1:
        del m.graph.output[:]
        return "no graph outputs"
    del m.graph.node[:]
    return "empty graph (no nodes)"


def duplicate_name(m, rng, d) -> str:
    choice = rng.integers(4)
    if choice == 0:
        t = _pick(rng, list(m.graph.initializer))
        m.graph.initializer.append(copy.deepcopy(t))
        return f"initializer {t.name!r} twice"
    if choice == 1:
        a, b = _node(m, rng), _node(m, rng)
        b.name = a.name or "n"
        a.name = b.name
        return f"two nodes named {a.name!r}"
    if choice == 2:
        m.graph.input.append(copy.deepcopy(m.graph.input[0]))
        return f"graph input {m.graph.input[0].name!r} twice"
    n = _node(m, rng)
    other = _node(m, rng)
    if not n.output or not other.output or n is other:
        raise Skip
    n.output[0] = other.output[0]
    return f"{_label(n)} writes {other.output[0]!r}, also written by another node"


# -- attributes -------------------------------------------------------------------------------

def _set_ints(n: onnx.NodeProto, name: str, values: list[int]) -> None:
    for a in n.attribute:
        if a.name == name:
            n.attribute.remove(a)
            break
    n.attribute.append(helper.make_attribute(name, values))


def conv_attr(m, rng, d) -> str:
    n = _node(m, rng, ("Conv", "MaxPool", "AveragePool"))
    what = int(rng.integers(6))
    if what == 0:
        _set_ints(n, "strides", [0, 0])
        return f"{_label(n)} strides 0"
    if what == 1:
        _set_ints(n, "pads", [-1, -2, -1, -2])
        return f"{_label(n)} negative pads"
    if what == 2:
        k = int(rng.choice([99, 1000, 1 << 20]))
        _set_ints(n, "kernel_shape", [k, k])
        return f"{_label(n)} kernel_shape {k}x{k}"
    if what == 3:
        _set_ints(n, "dilations", [int(rng.choice([0, -1, 50]))] * 2)
        return f"{_label(n)} dilations changed"
    if what == 4 and n.op_type == "Conv":
        g = int(rng.choice([0, -1, 3, 7, 1 << 30]))
        n.attribute.append(helper.make_attribute("group", g)) if not any(
            a.name == "group" for a in n.attribute) else None
        for a in n.attribute:
            if a.name == "group":
                a.i = g
        return f"{_label(n)} group {g}"
    _set_ints(n, "pads", [1 << 40] * 4)
    return f"{_label(n)} pads 2^40"


def any_attr(m, rng, d) -> str:
    """An attribute of any node: its value out of range, or of the wrong type."""
    n = _pick(rng, [n for n in m.graph.node if n.attribute])
    a = _pick(rng, list(n.attribute))
    kind = rng.integers(4)
    if kind == 0 and a.type == onnx.AttributeProto.INT:
        a.i = int(rng.choice([-(1 << 31), -7, 99, 1 << 40]))
        return f"{_label(n)} attribute {a.name} = {a.i}"
    if kind == 1 and a.type == onnx.AttributeProto.FLOAT:
        a.f = float(rng.choice([np.nan, np.inf, -1e38]))
        return f"{_label(n)} attribute {a.name} = {a.f}"
    if kind == 2 and a.type == onnx.AttributeProto.INTS:
        del a.ints[:]
        a.ints.extend(int(v) for v in rng.integers(-5, 100, int(rng.integers(0, 6))))
        return f"{_label(n)} attribute {a.name} = {list(a.ints)}"
    new = helper.make_attribute(a.name, "garbage") if a.type != onnx.AttributeProto.STRING \
        else helper.make_attribute(a.name, 3)
    n.attribute.remove(a)
    n.attribute.append(new)
    return f"{_label(n)} attribute {a.name} of the wrong type"


def unknown_op(m, rng, d) -> str:
    n = _node(m, rng)
    if rng.random() < 0.5:
        n.domain = "com.example.fuzz"
        return f"{_label(n)} in unknown domain com.example.fuzz"
    n.op_type = "FrobnicateX"
    return f"node {n.name!r} op_type FrobnicateX"


def opset(m, rng, d) -> str:
    v = int(rng.choice([1, 7, 12, 22, 99]))
    choice = rng.integers(4)
    if choice == 0:
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = v
        return f"opset {v}"
    if choice == 1:
        m.opset_import.append(helper.make_opsetid("com.example.fuzz", 1))
        return "extra opset_import for an unknown domain"
    if choice == 2:
        m.ir_version = int(rng.choice([0, 2, 99]))
        return f"ir_version {m.ir_version}"
    del m.opset_import[:]
    return "no opset_import"


# -- shapes and dtypes ----------------------------------------------------------------------

def input_shape(m, rng, d) -> str:
    v = _pick(rng, [i for i in m.graph.input if i.type.tensor_type.shape.dim])
    dims = v.type.tensor_type.shape.dim
    k = int(rng.integers(len(dims)))
    what = rng.integers(6)
    if what == 0:
        dims[k].dim_value = 0
    elif what == 1:
        dims[k].dim_param = "N"
    elif what == 2:
        dims[k].dim_value = int(rng.choice([2, 3, 5, 100, 1 << 17]))
    elif what == 3:
        dims.add().dim_value = 1
    elif what == 4:
        del dims[k]
    else:
        v.type.tensor_type.ClearField("shape")
        return f"input {v.name!r} without a shape"
    return f"input {v.name!r} shape {[x.dim_value or x.dim_param for x in dims]}"


def dtype(m, rng, d) -> str:
    new = int(rng.choice([TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64,
                          TensorProto.STRING, TensorProto.BOOL, TensorProto.UNDEFINED]))
    name = TensorProto.DataType.Name(new)
    if rng.random() < 0.5:
        v = _pick(rng, list(m.graph.input) + list(m.graph.output))
        v.type.tensor_type.elem_type = new
        return f"value {v.name!r} declared {name}"
    t = _pick(rng, list(m.graph.initializer))
    t.data_type = new
    return f"initializer {t.name!r} data_type {name} (same bytes)"


def init_shape(m, rng, d) -> str:
    t = _tensor_init(m, rng)
    what = rng.integers(3)
    if what == 0 and len(t.dims) > 1:
        old = list(t.dims)
        del t.dims[-1]
        t.dims[-1] *= old[-1]
        return f"initializer {t.name!r} reshaped {old} -> {list(t.dims)}"
    if what == 1:
        a = numpy_helper.to_array(t).ravel()[:1].reshape(())
        t.CopyFrom(numpy_helper.from_array(a.astype(np.float32), t.name))
        return f"initializer {t.name!r} made a scalar"
    t.dims.append(2)
    return f"initializer {t.name!r} dims {list(t.dims)} (data for half)"


# -- data -----------------------------------------------------------------------------------

def _raw(t: onnx.TensorProto) -> None:
    """Make the tensor hold its bytes in raw_data (so they can be cut)."""
    if not t.raw_data:
        try:
            a = numpy_helper.to_array(t)
        except ValueError:  # an earlier mutation left data that does not fit the dims
            a = np.zeros(0, np.float32)
        t.CopyFrom(numpy_helper.from_array(a, t.name))


def truncate_init(m, rng, d) -> str:
    t = _tensor_init(m, rng)
    _raw(t)
    cut = int(rng.integers(0, max(1, len(t.raw_data))))
    t.raw_data = t.raw_data[:cut]
    return f"initializer {t.name!r} raw data cut to {cut} bytes"


def corrupt_init(m, rng, d) -> str:
    t = _tensor_init(m, rng)
    _raw(t)
    b = bytearray(t.raw_data)
    for _ in range(int(rng.integers(1, 9))):
        b[int(rng.integers(len(b)))] = int(rng.integers(256))
    t.raw_data = bytes(b)
    return f"initializer {t.name!r} bytes flipped"


def nonfinite_weights(m, rng, d) -> str:
    t = _tensor_init(m, rng)
    a = numpy_helper.to_array(t).astype(np.float32).copy()
    flat = a.reshape(-1)
    value = float(rng.choice([np.nan, np.inf, -np.inf, 3e38, 1e-45]))
    idx = rng.choice(flat.size, max(1, flat.size // int(rng.choice([1, 4, 1000]))),
                     replace=False)
    flat[idx] = value
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    return f"initializer {t.name!r}: {len(idx)} value(s) set to {value}"


def external_data(m, rng, d) -> str:
    """Move a weight to external data, then break the reference or the file."""
    ext = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if ext and rng.random() < 0.6:
        t = _pick(rng, ext)
    else:
        t = _tensor_init(m, rng, min_size=2)
        _raw(t)
        data = t.raw_data
        (d / "weights.bin").write_bytes(data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", "weights.bin"), ("offset", "0"), ("length", str(len(data)))):
            e = t.external_data.add()
            e.key, e.value = k, v
    entries = {e.key: e for e in t.external_data}
    what = rng.integers(6)
    if what == 0:
        entries["location"].value = "missing.bin"
        return f"initializer {t.name!r}: external data file missing"
    if what == 1:
        entries["location"].value = "../../../../etc/passwd"
        return f"initializer {t.name!r}: external data path outside the model's directory"
    if what == 2:
        entries["location"].value = "/etc/hostname"
        return f"initializer {t.name!r}: external data at an absolute path"
    if what == 3 and "length" in entries:
        entries["length"].value = str(int(entries["length"].value) * 4 + 1)
        return f"initializer {t.name!r}: external length beyond the file"
    if what == 4:
        e = entries.get("offset") or t.external_data.add()
        e.key, e.value = "offset", str(int(rng.choice([-8, 1 << 40, 3])))
        return f"initializer {t.name!r}: external offset {e.value}"
    path = d / entries["location"].value
    if path.is_file():
        data = path.read_bytes()
        path.write_bytes(data[:int(rng.integers(0, max(1, len(data))))])
        return f"initializer {t.name!r}: external data file truncated"
    raise Skip


MUTATIONS: dict[str, Mutation] = {
    "drop_node": drop_node, "bypass_node": bypass_node, "duplicate_node": duplicate_node,
    "rewire_input": rewire_input, "make_cycle": make_cycle, "swap_order": swap_order,
    "dangling_output": dangling_output, "duplicate_name": duplicate_name,
    "conv_attr": conv_attr, "any_attr": any_attr, "unknown_op": unknown_op, "opset": opset,
    "input_shape": input_shape, "dtype": dtype, "init_shape": init_shape,
    "truncate_init": truncate_init, "corrupt_init": corrupt_init,
    "nonfinite_weights": nonfinite_weights, "external_data": external_data,
}
# file-level damage, applied to the serialized bytes after the graph mutations
FILE_MUTATIONS = ("truncate_file", "flip_bytes")


def damage_file(data: bytes, rng: np.random.Generator, how: str) -> tuple[bytes, str]:
    """The serialized model cut short or with bytes changed."""
    if how == "truncate_file":
        cut = int(rng.integers(0, len(data)))
        return data[:cut], f"file cut to {cut} of {len(data)} bytes"
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 17))):
        b[int(rng.integers(len(b)))] = int(rng.integers(256))
    return bytes(b), "file bytes flipped"
