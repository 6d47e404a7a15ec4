"""Edits of an ONNX graph in place that the base builder and the GGUF grid share."""

from __future__ import annotations


def insert_after(graph, after: dict[int, list]) -> None:
    """Put the nodes ``after[i]`` right after the graph's node ``i``, in place: new nodes that read
    only what node ``i`` and those before it make keep the node list in topological order."""
    nodes = []
    for i, n in enumerate(graph.node):
        nodes.append(n)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
