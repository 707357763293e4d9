"""Step 4: emit the moment graph as an ONNX file with a model card in its metadata."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import onnx
import torch
from torch.export import ExportedProgram

from .card import CARD_PREFIX


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's FutureWarnings and the exporter's 'torchvision is not installed' log lines during capture
    and export: they are about torch internals, not about anything the user can act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new


def _name_outputs(graph: onnx.GraphProto, names: Sequence[str]) -> None:
    """Give the graph outputs our names; an inner value that already has one of them (a LayerNorm's "mean")
    is renamed first (torch.onnx's output_names would collide with it)."""
    outputs = [o.name for o in graph.output]
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | {i.name for i in graph.initializer}
    for name in names:
        if name in taken and name not in outputs:
            _rename(graph, name, f"{name}__inner")
    for old, new in zip(outputs, names):
        if old != new:
            _rename(graph, old, new)


def emit_onnx(
    program: ExportedProgram,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    names: Sequence[str],
    model_card: dict[str, object],
    path: str | os.PathLike,
) -> Path:
    """Export ``program`` to ``path`` (batch dynamic), attach ``model_card`` and run the full ONNX check."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_torch():
        onnx_program = torch.onnx.export(
            program,
            tuple(example_inputs),
            input_names=list(input_names),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    model = onnx_program.model_proto
    _name_outputs(model.graph, names)
    del model.metadata_props[:]
    for key, value in model_card.items():
        entry = model.metadata_props.add()
        entry.key = CARD_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path
