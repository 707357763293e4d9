"""Step 3b: the captured graph's inputs as the moment rules see them: the user's inputs as given, parameters as
their means or, where the posterior has them, as random values (one noise per parameter, so tied uses share it),
buffers and constants as tensors.  Everything is held as buffers, so the traced moment graph carries it."""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from momentprop.passes import Moment
from momentprop.passes.moment import Noise

from .errors import CaptureError
from .posterior import canonical_names
from .structures import ParameterPosterior, Posterior


def _buffer_name(prefix: str, name: str) -> str:
    return prefix + "__" + re.sub(r"[^0-9a-zA-Z_]", "_", name)


class GraphInputs(nn.Module):
    """One value per placeholder of the captured graph, in order (:meth:`values`)."""

    def __init__(self, program: ExportedProgram, model: nn.Module, posterior: Posterior):
        super().__init__()
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

    def values(self, user_inputs: Iterable[object]) -> list[object]:
        """The placeholders' values: ``user_inputs`` (tensors or moments) where the graph takes the user's inputs."""
        user_inputs, moments, out = iter(user_inputs), {}, []
        for binding in self.bindings:
            if binding[0] == "input":
                out.append(next(user_inputs))
            elif binding[0] == "tensor":
                out.append(getattr(self, binding[1]))
            else:
                if binding not in moments:  # one noise per parameter, so tied uses share it
                    moments[binding] = self._random_parameter(getattr(self, binding[1]), binding[2])
                out.append(moments[binding])
        return out
