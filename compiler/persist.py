"""Save and load compiled models and posteriors without pickle.

Both are single safetensors files: the tensors are safetensors tensors and everything else is JSON in the
file's string metadata, under a format tag (``momentprop.format``), a format version and the kind of content.

* A compiled model keeps the moment graph as torch.export's own JSON schema (``torch._export.serde``, graph
  part only: its pickled state_dict/constants/example-input parts are never produced), the graph's buffers
  and constants as tensors, the :class:`CompiledInfo` and the example inputs' shapes and dtypes (only these
  matter: zeros stand in for them on load).  Loading rebuilds a real :class:`ExportedProgram` by handing the
  deserializer the tensors as in-memory dicts, so a loaded model is a full :class:`CompiledModel`.
* A posterior ``{name: Tensor | Kron | Dense | FullCovariance}`` keeps one JSON entry per parameter (name,
  kind, non-tensor fields) and its tensors under ``"<index>.<field>"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch._export.serde import serialize as serde
from torch.export import ExportedProgram

from ._version import __version__
from .emit import quiet_torch
from .errors import PersistenceError
from .structures import Dense, FullCovariance, Kron, ParameterPosterior, Posterior
from .options import CompiledInfo

FORMAT = "momentprop"
FORMAT_VERSION = 1
COMPILED_MODEL = "compiled_model"
POSTERIOR = "posterior"
_STRUCTURED: dict[str, type] = {cls.__name__: cls for cls in (Kron, Dense, FullCovariance)}


# ----------------------------------------------------------------------------------------------- file level


def _write(path: str | os.PathLike, content: str, tensors: dict[str, torch.Tensor], fields: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "momentprop.format": FORMAT,
        "momentprop.format_version": str(FORMAT_VERSION),
        "momentprop.content": content,
        "momentprop.version": __version__,
        "momentprop.torch_version": torch.__version__,
        **{f"momentprop.{k}": v for k, v in fields.items()},
    }
    # Fresh contiguous CPU copies: safetensors refuses views and tensors that share storage.
    tensors = {k: t.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _read(path: str | os.PathLike, content: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata fields (``momentprop.`` prefix removed) and tensors of a momentprop file of ``content``."""
    path = Path(path)
    if path.is_dir():
        raise PersistenceError(
            f"{path} is a directory, not a momentprop file; pass the path of a file written by cm.save(path) or "
            "mp.save_posterior(posterior, path)"
        )
    if not path.exists():
        raise PersistenceError(
            f"{path}: no such file; pass the path of a file written by cm.save(path) or "
            "mp.save_posterior(posterior, path)"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("momentprop.format") != FORMAT:
                raise PersistenceError(
                    f"{path} is a safetensors file but not a momentprop file (no 'momentprop.format' tag); "
                    "load files written by momentprop's save functions"
                )
            # cloned: fresh, aligned storage (results of some CPU kernels depend on the data's alignment)
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except SafetensorError as exc:
        raise PersistenceError(
            f"{path} is not a momentprop file, or it is truncated or corrupt (not a valid safetensors file: {exc})"
        ) from exc
    fields = {k.removeprefix("momentprop."): v for k, v in metadata.items() if k.startswith("momentprop.")}
    version = fields.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise PersistenceError(
            f"{path} has momentprop format version {version!r}; this momentprop ({__version__}) reads versions up to "
            f"{FORMAT_VERSION}: upgrade momentprop to load it"
        )
    if fields.get("content") != content:
        raise PersistenceError(
            f"{path} holds a momentprop {fields.get('content')!r}, not a {content!r}; load it with the matching "
            "function (load_compiled for compiled models, load_posterior for posteriors)"
        )
    return fields, tensors


def _corrupt(path: str | os.PathLike, what: str, exc: BaseException) -> PersistenceError:
    return PersistenceError(f"{path}: the {what} is corrupt or incompatible ({type(exc).__name__}: {exc})")


# ----------------------------------------------------------------------------------------------- compiled models


def _dtype(name: object) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def save_compiled(
    program: ExportedProgram, info: CompiledInfo, example_inputs: Sequence[torch.Tensor], path: str | os.PathLike
) -> Path:
    """Write a compiled model's parts to ``path`` (one safetensors file, no pickle) and return the path."""
    try:
        with quiet_torch():
            artifact = serde.serialize(
                program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
            )
    except Exception as exc:
        raise PersistenceError(f"cannot serialise the moment graph: {type(exc).__name__}: {exc}") from exc
    tensors = {f"state_dict/{k}": v for k, v in program.state_dict.items()}
    for name, value in program.constants.items():
        if not isinstance(value, torch.Tensor):
            raise PersistenceError(f"the moment graph holds a non-tensor constant '{name}' ({type(value).__name__})")
        tensors[f"constants/{name}"] = value
    examples = [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in example_inputs]
    fields = {
        "info": json.dumps(info.to_json()),
        "example_inputs": json.dumps(examples),
        "graph": artifact.exported_program.decode("utf-8"),
    }
    return _write(path, COMPILED_MODEL, tensors, fields)


def load_compiled(path: str | os.PathLike) -> tuple[ExportedProgram, CompiledInfo, tuple[torch.Tensor, ...]]:
    """Read a compiled model's parts written by :func:`save_compiled`: (moment graph, info, example inputs)."""
    fields, tensors = _read(path, COMPILED_MODEL)
    try:
        info = CompiledInfo.from_json(json.loads(fields["info"]))
        shapes = json.loads(fields["example_inputs"])
        examples = tuple(torch.zeros(e["shape"], dtype=_dtype(e["dtype"])) for e in shapes)
        state_dict = {k.removeprefix("state_dict/"): v for k, v in tensors.items() if k.startswith("state_dict/")}
        constants = {k.removeprefix("constants/"): v for k, v in tensors.items() if k.startswith("constants/")}
        graph = fields["graph"].encode("utf-8")
    except Exception as exc:
        raise _corrupt(path, "model description", exc) from exc
    try:
        with quiet_torch():
            # dicts, not bytes, for the tensor parts: the deserializer takes them as they are (no torch.load)
            artifact = serde.SerializedArtifact(graph, state_dict, constants, b"")  # type: ignore[arg-type]
            program = serde.deserialize(artifact)
            return program, info, examples
    except Exception as exc:
        raise _corrupt(path, "moment graph", exc) from exc


# ----------------------------------------------------------------------------------------------- posteriors


def save_posterior(posterior: Posterior, path: str | os.PathLike) -> Path:
    """Write ``{parameter name: Tensor | Kron | Dense | FullCovariance}`` to ``path`` and return the path."""
    if not isinstance(posterior, dict):
        raise PersistenceError(
            f"save_posterior takes a dict {{parameter name: variance tensor or Kron/Dense/FullCovariance}}, "
            f"got {type(posterior).__name__}"
        )
    entries: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, value) in enumerate(posterior.items()):
        if not isinstance(name, str):
            raise PersistenceError(f"posterior keys must be parameter names (str), got {name!r}")
        if isinstance(value, torch.Tensor):
            entries.append({"name": name, "kind": "Tensor"})
            tensors[str(i)] = value
        elif isinstance(value, (Kron, Dense, FullCovariance)):
            values = {}
            for field in dataclasses.fields(value):
                item = getattr(value, field.name)
                if isinstance(item, torch.Tensor):
                    tensors[f"{i}.{field.name}"] = item
                else:
                    values[field.name] = item
            entries.append({"name": name, "kind": type(value).__name__, "values": values})
        else:
            raise PersistenceError(
                f"cannot save the posterior entry '{name}' of type {type(value).__name__}; entries must be tensors "
                "or momentprop.posterior.Kron / Dense / FullCovariance"
            )
    return _write(path, POSTERIOR, tensors, {"entries": json.dumps(entries)})


def _entry(i: int, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ParameterPosterior:
    if entry["kind"] == "Tensor":
        return tensors[str(i)]
    cls = _STRUCTURED[entry["kind"]]
    values = dict(entry["values"])
    for field in dataclasses.fields(cls):
        if field.name not in values:
            values[field.name] = tensors[f"{i}.{field.name}"]
    return cls(**values)


def load_posterior(path: str | os.PathLike) -> Posterior:
    """Read a posterior written by :func:`save_posterior` (same names, kinds, dtypes and values)."""
    fields, tensors = _read(path, POSTERIOR)
    try:
        return {entry["name"]: _entry(i, entry, tensors) for i, entry in enumerate(json.loads(fields["entries"]))}
    except Exception as exc:
        raise _corrupt(path, "posterior", exc) from exc
