"""Step 3: rewrite the captured graph into its moment-propagating analogue.

:class:`MomentInterpreter` walks the captured ATen graph once per call: ops whose arguments are all
deterministic run unchanged, every other op goes to its rule from ``momentprop.passes`` (with what the pre-pass,
``prepass.py``, found about the graph as a whole).  Exporting that
interpreter with torch.export traces the rules into a plain ATen graph, the *moment graph*: it is what
``cm(x)`` runs and what is emitted to ONNX, so torch and ONNX agree by construction, and branches that carry
no variance never appear in it.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

from momentprop.passes import Moment, RuleContext, heads, lookup
from momentprop.passes.moment import Noise

from .capture import dynamic_shapes, with_batch_of_two
from .errors import CaptureError, InputError, UnsupportedOpError
from .options import Options
from .prepass import analyse
from .posterior import canonical_names
from .structures import ParameterPosterior, Posterior

def _buffer_name(prefix: str, name: str) -> str:
    return prefix + "__" + re.sub(r"[^0-9a-zA-Z_]", "_", name)


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
        self.bindings: list[tuple] = []
        self.posterior_kinds: dict[str, object] = {}  # random parameter -> its structure (None: diagonal)
        aliases = canonical_names(model)
        state = program.state_dict
        for spec in program.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                self.bindings.append(("input",))
            elif spec.kind == InputKind.PARAMETER:
                name = aliases.get(spec.target, spec.target)
                mean_key = _buffer_name("mean", name)
                if not hasattr(self, mean_key):
                    self.register_buffer(mean_key, state[spec.target].detach().clone())
                if name not in posterior:
                    self.bindings.append(("tensor", mean_key))
                    continue
                if name not in self.posterior_kinds:
                    self._register_posterior(name, posterior[name], state[spec.target])
                self.bindings.append(("moment", mean_key, name))
            elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                key = _buffer_name("const", spec.target)
                persistent = spec.kind == InputKind.BUFFER and spec.persistent
                value = state[spec.target] if persistent else program.constants[spec.target]
                self.register_buffer(key, value.detach().clone())
                self.bindings.append(("tensor", key))
            else:
                raise CaptureError(f"unsupported graph input kind {spec.kind} ({spec.target})")
        self.facts = analyse(self.graph, config.output_covariance)
        self.register_buffer("variance_scale", torch.tensor(float(options.variance_scale)))
        if config.likelihood == "regression":
            self.register_buffer("noise_variance", torch.tensor(float(options.sigma_noise or 0.0) ** 2))

    @property
    def random_parameters(self) -> list[str]:
        return list(self.posterior_kinds)

    def _register_posterior(self, name: str, spec: ParameterPosterior, param: torch.Tensor) -> None:
        """Store the posterior of parameter ``name`` as buffers, with everything that depends on the posterior
        alone (marginal variances, rearranged blocks, eigenbases) computed here, once, rather than in the graph."""
        tensors = {"var": spec} if isinstance(spec, torch.Tensor) else spec.buffers(param)
        for field_name, tensor in tensors.items():
            self.register_buffer(_buffer_name(field_name, name), tensor.to(param.dtype).clone())
        self.posterior_kinds[name] = None if isinstance(spec, torch.Tensor) else spec

    def _random_parameter(self, mean: torch.Tensor, name: str) -> Moment:
        """The random value of a parameter: its mean plus one noise of the posterior's covariance kind."""
        spec = self.posterior_kinds[name]
        field = lambda f: getattr(self, _buffer_name(f, name))  # noqa: E731
        if spec is None:
            return Moment.of_noise(mean, Noise(field("var")))
        noise, jacobian = spec.noise(field)
        return Moment.of_noise(mean, noise, jacobian=jacobian)

    def _bind(self, binding: tuple, user_inputs, moments: dict) -> object:
        if binding[0] == "input":
            return next(user_inputs)
        if binding[0] == "tensor":
            return getattr(self, binding[1])
        if binding not in moments:  # one noise per parameter, so tied uses share it
            moments[binding] = self._random_parameter(getattr(self, binding[1]), binding[2])
        return moments[binding]

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
        ctx = RuleContext(covariance, self.config.attention, self.config.predictive, is_attention)
        out = rule.fn(ctx, *args, **kwargs)
        if covariance == "full":
            pytree.tree_map_only(Moment, lambda m: _check_full_size(m, _describe(node)), out)
        else:  # the diag policy: matrix maps collapse where they are formed
            out = pytree.tree_map_only(Moment, Moment.collapsed_matrix_maps, out)
        return out

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``inputs``: the model's inputs, followed by one elementwise variance per input under input_variance."""
        env: dict[torch.fx.Node, object] = {}
        if self.config.input_variance:
            half = len(inputs) // 2
            inputs = tuple(Moment.diagonal(x, v) for x, v in zip(inputs[:half], inputs[half:]))
        user_inputs = iter(inputs)
        placeholders = iter(self.bindings)
        moments: dict[tuple, Moment] = {}
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node] = self._bind(next(placeholders), user_inputs, moments)
            elif node.op == "call_function" and node in self.facts.needed:
                env[node] = self._run_node(node, env)
        return self._head(env[self.facts.output])

    def _head(self, out: object) -> tuple[torch.Tensor, ...]:
        full = self.config.returns_covariance
        if isinstance(out, Moment):  # rounding can leave a variance slightly negative or a covariance asymmetric
            mean, var = out.mean, heads.symmetric(out.covariance()) if full else out.variance().clamp_min(0.0)
        else:
            mean = out
            var = out.new_zeros(*out.shape, out.shape[-1]) if full else torch.zeros_like(out)
        var = var * self.variance_scale
        if self.config.likelihood == "classification":
            return mean, var, heads.class_probabilities(mean, var, full, self.config.link)
        if self.config.likelihood == "regression":
            return mean, var, heads.add_observation_noise(var, self.noise_variance, full)
        return mean, var


def rewrite(interpreter: MomentInterpreter, example_inputs: Sequence[torch.Tensor]) -> ExportedProgram:
    """Trace the interpreter into the moment graph (an ExportedProgram with a dynamic batch)."""
    inputs = with_batch_of_two(example_inputs)
    with torch.no_grad():
        return torch.export.export(
            interpreter, inputs, dynamic_shapes=(dynamic_shapes(inputs),), strict=False
        )
