"""A small editable view of an ONNX graph for the canonicalization rules.

Rules read producers, consumers and constants, rewire uses and add nodes; `prune` drops what
nothing reads any more and `to_model` writes the nodes back in topological order. Constants
are initializers or Constant nodes; everything else is a node output or a graph input.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Graph:
    """Nodes, constants and graph outputs of one ONNX model, editable in place."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = onnx.GraphProto()
        g.CopyFrom(model.graph)  # rules edit nodes in place: never the caller's model
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t)
                                             for t in g.initializer}
        self.nodes: list[onnx.NodeProto] = []
        for node in g.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 \
                    and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            else:
                self.nodes.append(node)
        self.outputs = [o.name for o in g.output]
        # Graph inputs proper: an initializer listed as an input too (what exporters with
        # keep_initializers_as_inputs write) is a constant, gone when nothing reads it.
        self.inputs = [i for i in g.input if i.name not in self.consts]
        self._names = itertools.count()
        self._index()
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def _index(self) -> None:
        self._producer = {o: n for n in self.nodes for o in n.output if o}
        self._consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                if i:
                    self._consumers[i].append(n)

    # -- reading --------------------------------------------------------------------------

    def producer(self, value: str) -> onnx.NodeProto | None:
        return self._producer.get(value)

    def consumers(self, value: str) -> list[onnx.NodeProto]:
        return list(self._consumers.get(value, []))

    def const(self, value: str) -> np.ndarray | None:
        return self.consts.get(value)

    def scalar(self, value: str) -> float | None:
        """A constant with one element, as a Python float (None otherwise)."""
        c = self.consts.get(value)
        return None if c is None or c.size != 1 else float(c.reshape(()))

    def is_output(self, value: str) -> bool:
        return value in self.outputs

    def shape_of(self, value: str) -> tuple[int, ...] | None:
        """A value's static shape by ONNX shape inference (None where it is not static)."""
        if self._shapes is None:
            inferred = onnx.shape_inference.infer_shapes(self.to_model(prune=False))
            g = inferred.graph
            self._shapes = {}
            for v in [*g.input, *g.value_info, *g.output]:
                dims = v.type.tensor_type.shape.dim
                if all(d.HasField("dim_value") for d in dims):
                    self._shapes[v.name] = tuple(d.dim_value for d in dims)
        if value in self.consts:
            return tuple(self.consts[value].shape)
        return self._shapes.get(value)

    # -- editing --------------------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        """A value or node name not used anywhere yet."""
        while True:
            name = f"{hint}__c{next(self._names)}"
            if name not in self._producer and name not in self.consts:
                return name

    def add_const(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.consts[name] = np.asarray(array)
        return name

    def add_node(self, op: str, inputs: list[str], hint: str, n_out: int = 1,
                 **attrs) -> list[str]:
        """Append a node (order is restored by `to_model`); returns its output names."""
        outs = [self.fresh(hint) for _ in range(n_out)]
        self.add_node_named(op, inputs, outs, hint, **attrs)
        return outs

    def add_node_named(self, op: str, inputs: list[str], outputs: list[str], hint: str,
                       **attrs) -> None:
        """Append a node writing the given (existing, now unproduced) value names."""
        node = helper.make_node(op, inputs, outputs, name=self.fresh(hint), **attrs)
        self.nodes.append(node)
        self._producer.update({o: node for o in outputs})
        for i in inputs:
            if i:
                self._consumers[i].append(node)

    def rename_output(self, node: onnx.NodeProto, old: str, new: str) -> None:
        """`node` writes `new` instead of `old` (readers of `old` are left to the caller)."""
        node.output[list(node.output).index(old)] = new
        self._producer.pop(old, None)
        self._producer[new] = node

    def set_input(self, node: onnx.NodeProto, k: int, value: str) -> None:
        """`node` reads `value` as its k-th input (the consumer index follows)."""
        old = node.input[k]
        if old == value:
            return
        node.input[k] = value
        if old:
            readers = self._consumers.get(old, [])
            at = next((j for j, r in enumerate(readers) if r is node), None)
            if at is not None:
                del readers[at]
        if value:
            self._consumers[value].append(node)

    def remove(self, node: onnx.NodeProto) -> None:
        """Drop `node` (its outputs are then unproduced: the caller rewires their readers)."""
        self.nodes = [n for n in self.nodes if n is not node]
        for o in node.output:
            if self._producer.get(o) is node:
                del self._producer[o]
        for i in set(node.input):
            if i in self._consumers:
                self._consumers[i] = [r for r in self._consumers[i] if r is not node]

    def replace_uses(self, old: str, new: str) -> None:
        """Every reader of `old` (nodes and graph outputs) reads `new` instead."""
        for n in self._consumers.pop(old, []):
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new
            self._consumers[new].append(n)
        if old in self.outputs:  # keep the graph output's name: route it through Identity
            prev = self._producer.get(old)
            if prev is not None:
                self.rename_output(prev, old, self.fresh(old))
            self.add_node_named("Identity", [new], [old], "out")

    def prune(self) -> None:
        """Drop nodes whose outputs nothing reads, and constants no node reads."""
        live = set(self.outputs)
        keep: list[onnx.NodeProto] = []
        for n in reversed(self._topo()):
            if any(o in live for o in n.output):
                keep.append(n)
                live.update(i for i in n.input if i)
        self.nodes = keep[::-1]
        self.consts = {k: v for k, v in self.consts.items() if k in live}
        self._index()
        self._shapes = None

    def _topo(self) -> list[onnx.NodeProto]:
        ready = {i.name for i in self.inputs} | set(self.consts) | {""}
        pending, order = list(self.nodes), []
        while pending:
            rest = []
            for n in pending:
                if all(i in ready for i in n.input):
                    order.append(n)
                    ready.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise ValueError(f"graph has a cycle or a dangling input at {rest[0].name}")
            pending = rest
        return order

    def to_model(self, prune: bool = True) -> onnx.ModelProto:
        """A new ModelProto: same inputs and outputs, these nodes and constants, the opsets
        of the domains they use (the standard one always)."""
        if prune:
            self.prune()
        g = self.model.graph
        graph = helper.make_graph(
            self._topo(), g.name, self.inputs, list(g.output),
            [numpy_helper.from_array(np.asarray(v), k) for k, v in self.consts.items()])
        used = {n.domain for n in graph.node}  # a lowered custom domain (QONNX) is dropped
        opsets = [o for o in self.model.opset_import
                  if o.domain in ("", "ai.onnx") or o.domain in used]
        model = helper.make_model(graph, opset_imports=opsets,
                                  producer_name=self.model.producer_name or "abc-tvm")
        model.ir_version = self.model.ir_version
        return model
