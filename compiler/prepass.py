"""Step 3a: what the moment rules need to know about the captured graph as a whole, found once before it is
interpreted: which nodes the first output needs, which softmaxes are attention weights, which nodes follow the
final linear layer (whose covariance ``output_covariance`` keeps), and which values reach nothing but variance
readers (which ``covariance="diag"`` may carry as one variance)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from momentprop.passes.attention import SOFTMAXES
from momentprop.passes.data_movement import IDENTITIES
from momentprop.passes.linear import MATRIX_PRODUCTS
from momentprop.passes.moment import same_shape
from momentprop.passes.registry import lookup

from .errors import CaptureError


@dataclass(frozen=True)
class GraphFacts:
    output: torch.fx.Node  # the model's first output tensor, whose moments are computed
    needed: set[torch.fx.Node]  # the nodes it depends on (the others feed only other outputs and are skipped)
    keeps_maps: set[torch.fx.Node]  # nodes from the final linear layer on (full covariance under output_covariance)
    attention_weights: set[torch.fx.Node]  # softmaxes whose result is the left operand of a matrix product
    variance_only: set[torch.fx.Node]  # values whose noises nothing downstream tells apart (see below)


def analyse(graph: torch.fx.Graph, output_covariance: bool) -> GraphFacts:
    output = _first_output(graph)
    needed = _reachable(output, upstream=True)
    final_layer = _final_layer(graph, needed) if output_covariance else None
    keeps_maps = _reachable(final_layer, upstream=False) if final_layer is not None else set()
    return GraphFacts(output, needed, keeps_maps, _attention_weights(graph),
                      _variance_only(graph, needed - keeps_maps))


def _variance_only(graph: torch.fx.Graph, diag_nodes: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Nodes whose value reaches the output only through entrywise ops (each output entry from the same entry of
    each operand: elementwise ops, copies), then at most one padding, into ops that read it only through its
    elementwise variance under the diag policy (a convolution's paper rule).  Along such paths no two entries of
    the value are ever combined, so its noises' identities do not matter downstream: under ``covariance="diag"``
    the value may be carried as one fresh noise of its variance, with the same result, where no other live value
    shares its noises (``rewrite.py`` checks that).  A CNN's batch norm with a random scale and shift then pads,
    masks and squares one variance instead of its four terms."""

    def reads_variance(user: torch.fx.Node, value: torch.fx.Node) -> bool:
        return _reads(user, diag_nodes) == "variance" and _only_first_operand(user, value)

    found: set[torch.fx.Node] = set()
    for node in reversed(graph.nodes):  # users first
        users = [u for u in node.users if u in diag_nodes]
        if node.op != "call_function" or node not in diag_nodes or not users:
            continue
        if all(
            reads_variance(user, node)
            or (_reads(user, diag_nodes) == "moves" and _only_first_operand(user, node)
                and all(reads_variance(u, user) for u in user.users if u in diag_nodes))
            or (_reads(user, diag_nodes) == "entrywise" and user in found and _same_shape_as(node, user))
            for user in users
        ):
            found.add(node)
    return found


def _reads(user: torch.fx.Node, diag_nodes: set[torch.fx.Node]):
    rule = lookup(user.target) if user.op == "call_function" and user in diag_nodes else None
    return rule.reads if rule is not None else None


def _only_first_operand(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    operands = [a for a in pytree.tree_leaves((user.args, user.kwargs)) if a is value]
    return bool(user.args) and user.args[0] is value and len(operands) == 1


def _same_shape_as(value: torch.fx.Node, user: torch.fx.Node) -> bool:
    a, b = value.meta.get("val"), user.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and same_shape(a.shape, b.shape)


def _first_output(graph: torch.fx.Graph) -> torch.fx.Node:
    """The first tensor the model returns (the logits of a (logits, kl) pair or of a model-output container)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = [leaf for leaf in pytree.tree_leaves(output.args) if isinstance(leaf, torch.fx.Node)]
    if not leaves:
        raise CaptureError("the model returns no tensor; momentprop needs a tensor output to propagate moments to")
    return leaves[0]


def _attention_weights(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Softmax nodes whose result (through copies and dropout) is the left operand of a matrix product: the
    attention weights, which the paper's rule takes at the mean.  Any other softmax (a classifier's) is
    linearised."""
    found = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SOFTMAXES:
            continue
        frontier = [node]
        while frontier:
            value = frontier.pop()
            for user in value.users:
                if user.target in MATRIX_PRODUCTS and user.args and user.args[0] is value:
                    found.add(node)
                elif user.target in IDENTITIES:
                    frontier.append(user)
    return found


def _reachable(node: torch.fx.Node, upstream: bool) -> set[torch.fx.Node]:
    """``node`` and every node it depends on (``upstream``) or that depends on it."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes if upstream else n.users)
    return seen


def _final_layer(graph: torch.fx.Graph, needed: set[torch.fx.Node]) -> torch.fx.Node | None:
    """The last matrix-product node the output depends on."""
    finals = [n for n in graph.nodes if n in needed and n.op == "call_function" and n.target in MATRIX_PRODUCTS]
    return finals[-1] if finals else None


def has_attention(graph: torch.fx.Graph) -> bool:
    """Attention weights or a fused attention op anywhere in the graph."""
    return bool(_attention_weights(graph)) or any(
        node.op == "call_function" and node.target is torch.ops.aten.scaled_dot_product_attention.default
        for node in graph.nodes)


def output_shape(graph: torch.fx.Graph) -> tuple:
    """The shape of the model's first output (symbolic sizes for dynamic dims)."""
    return tuple(_first_output(graph).meta["val"].shape)


def random_kernel_entries(program: torch.export.ExportedProgram, random_names) -> int:
    """The entries of every convolution kernel in the graph that is a random parameter (named in
    ``random_names``), whatever module or functional call made the convolution."""
    parameters = program.graph_signature.inputs_to_parameters
    total, seen = 0, set()
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.convolution.default:
            kernel = node.args[1]
            name = parameters.get(getattr(kernel, "name", None))
            if name in random_names and name not in seen:
                seen.add(name)
                total += kernel.meta["val"].numel()
    return total
