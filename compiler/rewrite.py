"""Step 3: rewrite the captured graph into its moment-propagating analogue.

:class:`MomentInterpreter` walks the captured ATen graph once per call: ops whose arguments are all
deterministic run unchanged, every other op goes to its rule from ``momentprop.passes`` (with what the pre-pass,
``prepass.py``, found about the graph as a whole).  Exporting that
interpreter with torch.export traces the rules into a plain ATen graph, the *moment graph*: it is what
``cm(x)`` runs and what is emitted to ONNX, so torch and ONNX agree by construction, and branches that carry
no variance never appear in it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

from momentprop.passes import Moment, RuleContext, heads, lookup
from momentprop.passes.moment import Noise

from .capture import dynamic_shapes, with_batch_of_two
from .errors import InputError, MomentpropError, UnsupportedOpError
from .bind import GraphInputs
from .options import Options
from .prepass import analyse
from .structures import Posterior

# the largest feature dimension whose covariance is formed per row (4096^2 float32 = 64 MiB per row or token)
MAX_FULL_FEATURES = 4096


def _check_full_size(value: object, where: str) -> None:
    # a symbolic size (the batch moved into the last dim) is never refused: comparing it would add a guard
    if isinstance(value, Moment) and statically_known_true(value.feature_size > MAX_FULL_FEATURES):
        size = int(value.feature_size)
        raise InputError(
            f"a full covariance over {size:,} features ({size * size * 4 / 2**20:,.0f} MiB per row, per token for a "
            f"sequence) would be formed in {where}.\nFull covariance is limited to {MAX_FULL_FEATURES:,} features. "
            "What you can do: use covariance='diag' without output_covariance (variances only, the paper's rule), "
            "or make the layers with that many outputs deterministic (leave them out of the posterior)."
        )


def _describe(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    module = "the top-level model"
    if stack:
        path, kind = list(stack.values())[-1]
        module = f"module '{path or '<root>'}' ({getattr(kind, '__name__', kind)})"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [i for i, line in enumerate(trace) if line.strip().startswith("File ")]
    source = ""
    if frames:
        last = frames[-1]
        source = "; source: " + " ".join(line.strip() for line in trace[last:last + 2])
    return f"{module}{source}"


def _is_one_plain_noise(value: Moment) -> bool:
    """One fresh noise, not moved or scaled: carrying it as one variance would change nothing."""
    (t, *rest) = value.terms
    return not rest and type(t.noise) is Noise and not t.layout and t.jacobian is None and not isinstance(
        t.scale, torch.Tensor) and t.scale == 1.0


def _shares_live_noise(value: Moment, node: torch.fx.Node, env: dict, needed: set[torch.fx.Node]) -> bool:
    """Whether ``value`` (``node``'s) draws on a noise that a value still to be used after ``node`` draws on too,
    or has a projection's shared noise (attention)."""
    if any(t.shared is not None for t in value.terms):
        return True
    groups = {id(t.noise.group) for t in value.terms}
    for other, held in env.items():
        if all(user in env or user is node or user not in needed for user in other.users):
            continue
        for leaf in pytree.tree_leaves(held):
            if isinstance(leaf, Moment) and any(id(t.noise.group) in groups for t in leaf.terms):
                return True
    return False


class MomentInterpreter(nn.Module):
    """Runs the captured graph with moment rules; returns (mean, variance-or-covariance[, head output])."""

    def __init__(
        self,
        program: ExportedProgram,
        model: nn.Module,
        posterior: Posterior,
        options: Options,
    ):
        super().__init__()
        self.graph = program.graph_module.graph
        self.config = config = options
        self.inputs = GraphInputs(program, model, posterior)
        self.facts = analyse(self.graph, config.output_covariance)
        self.register_buffer("variance_scale", torch.tensor(float(options.variance_scale)))
        if config.likelihood == "regression":
            self.register_buffer("noise_variance", torch.tensor(float(options.sigma_noise or 0.0) ** 2))

    @property
    def random_parameters(self) -> list[str]:
        return self.inputs.random_parameters

    def _run_node(self, node: torch.fx.Node, env: dict) -> object:
        args, kwargs = pytree.tree_map_only(torch.fx.Node, env.__getitem__, (node.args, node.kwargs))
        if not any(isinstance(leaf, Moment) for leaf in pytree.tree_leaves((args, kwargs))):
            return node.target(*args, **kwargs)
        rule = lookup(node.target)
        if rule is None:
            raise UnsupportedOpError(
                f"no moment rule for op {node.target} reached by random values, in {_describe(node)}.\n"
                "What you can do: make the parameters feeding this op deterministic (leave them out of the "
                "posterior), replace the op by a supported one, or add a rule with "
                "@momentprop.passes.register(<op>) (see the README, 'Adding an op')."
            )
        covariance = "full" if node in self.facts.keeps_maps else self.config.covariance
        is_attention = node in self.facts.attention_weights
        ctx = RuleContext(covariance, self.config.attention, self.config.predictive, is_attention,
                          self.config.activations)
        out = rule.fn(ctx, *args, **kwargs)
        if covariance == "full":
            pytree.tree_map_only(Moment, lambda m: _check_full_size(m, _describe(node)), out)
        else:  # the diag policy: matrix maps collapse where they are formed
            out = pytree.tree_map_only(Moment, Moment.collapsed_matrix_maps, out)
            if node in self.facts.variance_only and isinstance(out, Moment) and not _is_one_plain_noise(out) \
                    and not _shares_live_noise(out, node, env, self.facts.needed):
                out = Moment.diagonal(out.mean, out.variance())
        return out

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``inputs``: the model's inputs, followed by one elementwise variance per input under input_variance."""
        env: dict[torch.fx.Node, object] = {}
        if self.config.input_variance:
            half = len(inputs) // 2
            inputs = tuple(Moment.diagonal(x, v) for x, v in zip(inputs[:half], inputs[half:]))
        values = iter(self.inputs.values(inputs))
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(values)
            elif node.op == "call_function" and node in self.facts.needed:
                env[node] = self._run_node(node, env)
        config = self.config
        return heads.outputs(env[self.facts.output], config.returns_covariance, self.variance_scale, config.likelihood,
                             config.link, getattr(self, "noise_variance", None))


def rewrite(interpreter: MomentInterpreter, example_inputs: Sequence[torch.Tensor],
            images: bool = False) -> ExportedProgram:
    """Trace the interpreter into the moment graph (an ExportedProgram with a dynamic batch; ``images``: and a
    dynamic image size, where the rules allow it, else the example's)."""
    inputs = with_batch_of_two(example_inputs)

    def export(images: bool) -> ExportedProgram:
        with torch.no_grad():
            return torch.export.export(
                interpreter, inputs, dynamic_shapes=(dynamic_shapes(inputs, images),), strict=False
            )

    if images:
        try:
            return export(images=True)
        except MomentpropError:
            raise
        except Exception:
            pass  # a rule that needs the image size: the example's
    return export(images=False)
