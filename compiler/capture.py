"""Step 1: capture the model as an ATen graph with torch.export, batch size, sequence length and (on request) image
size dynamic (the last two where the model allows).

Decomposition goes down to core ATen except for the ops that have a moment rule of their own (``linear``,
``gelu``, ``silu``, ...): keeping those whole gives smaller graphs, and composites we do not keep are still
linearised as one function by the elementwise rules.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from momentprop.passes import kept_whole

from .errors import CaptureError, InputError


def normalise_example_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """Check the example inputs and return them as a tuple of tensors."""
    if example_inputs is None:
        raise InputError(
            "example_inputs is required: pass a tuple of input tensors for one call of model(...), "
            "e.g. example_inputs=(x,)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InputError(
            f"example_inputs must be a non-empty tuple of tensors, got {type(example_inputs).__name__}"
        )
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"example_inputs[{i}] is a {type(x).__name__}; every example input must be a tensor")
        if x.dim() == 0:
            raise InputError(f"example_inputs[{i}] is a scalar; inputs need a leading batch dimension")
        if x.shape[0] == 0:
            raise InputError(
                f"example_inputs[{i}] has batch size 0 (shape {tuple(x.shape)}); pass at least one example "
                "(the batch stays dynamic in the compiled model whatever the example's batch size)"
            )
    return tuple(example_inputs)


def is_sequence(x: torch.Tensor) -> bool:
    """Token ids and their masks, (batch, sequence) integer tensors, have a dynamic sequence length."""
    return not x.is_floating_point() and x.dtype != torch.bool and x.dim() == 2


def with_batch_of_two(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """torch.export fixes a dynamic dimension whose example size is 1, so capture at batch 2 at least (and at
    sequence length 2 at least)."""
    widened = []
    for x in inputs:
        if x.shape[0] < 2:
            x = x.expand(2, *x.shape[1:]).clone()
        if is_sequence(x) and x.shape[1] < 2:
            x = torch.cat([x, x], dim=1)
        widened.append(x)
    return tuple(widened)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


def is_image(x: torch.Tensor) -> bool:
    """Floating (batch, channels, *spatial) inputs: images, volumes and signals (1-d to 3-d)."""
    return x.is_floating_point() and 3 <= x.dim() <= 5


# ops that ONNX export fixes to the example's image size (an adaptive pooling to a size other than 1 gets the
# example's kernel): a model with one keeps a fixed image size
_FIXED_SIZE_OPS = {getattr(torch.ops.aten, name).default for name in (
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")}


def dynamic_shapes(inputs: Sequence[torch.Tensor], images: bool = True) -> tuple[dict[int, Dim], ...]:
    """Dim 0 of every input is the batch; dim 1 of (batch, sequence) integer inputs (token ids, masks) is the
    sequence length and (with ``images``) the spatial dims of images are the image size, each dynamic where the
    model allows it (Dim.AUTO: a flatten into a linear layer fixes the image size, for instance)."""
    batch = Dim("batch")
    shapes = []
    for x in inputs:
        if is_sequence(x):
            shapes.append({0: batch, 1: Dim.AUTO})
        elif images and is_image(x):
            shapes.append({0: batch, **{d: Dim.AUTO for d in range(2, x.dim())}})
        else:
            shapes.append({0: batch})
    return tuple(shapes)


def free_dims(program: ExportedProgram) -> list[set[int]]:
    """For each user input of ``program``, the dims that are dynamic (symbolic in the traced graph)."""
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [{d for d, size in enumerate(nodes[name].meta["val"].shape) if not isinstance(size, int)}
            for name in names]


def _fixes_image_size(program: ExportedProgram) -> bool:
    pooled = [n for n in program.graph.nodes if n.target in _FIXED_SIZE_OPS]
    return any(any(size != 1 for size in (n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]))
               for n in pooled)


def _takes_varargs(model: nn.Module) -> bool:
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters)


def _export(model: nn.Module, inputs: tuple, images: bool) -> ExportedProgram:
    """torch.export; with ``images``, a dynamic image size where the model and ONNX export allow it, else a fixed
    one."""
    def export(images: bool) -> ExportedProgram:
        shapes = dynamic_shapes(inputs, images)
        if _takes_varargs(model):  # forward(*xs): torch.export wants the specs of the varargs nested
            shapes = (shapes,)
        return torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)

    if not images or not any(is_image(x) for x in inputs):
        return export(images=False)
    try:
        program = export(images=True)
        if not _fixes_image_size(program):
            return program
    except Exception:
        pass  # the image size is fixed (the error, if any, comes again from the capture below)
    return export(images=False)


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor], images: bool = False) -> ExportedProgram:
    """Export ``model`` in eval mode with a dynamic batch (with ``images``: and image size, where the model allows
    it) and decompose it to the op set of the rules."""
    inputs = with_batch_of_two(example_inputs)
    with eval_mode(model), torch.no_grad():
        try:
            model(*inputs)
        except Exception as exc:
            shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
            raise InputError(
                f"calling the model on example_inputs of shapes {shapes} failed ({type(exc).__name__}: {exc}); "
                "pass example inputs that model(*example_inputs) accepts"
            ) from exc
        try:
            program = _export(model, inputs, images)
        except Exception as exc:
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__} with a dynamic batch dimension: "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}\n"
                "momentprop needs a model that torch.export.export(model, example_inputs, strict=False) can "
                "trace; data-dependent Python control flow and ops that fix the batch size are the usual causes "
                "(see https://pytorch.org/docs/stable/export.html)."
            ) from exc
    table = torch.export.default_decompositions()
    for op in kept_whole():
        table.pop(op, None)
    return program.run_decompositions(table)
