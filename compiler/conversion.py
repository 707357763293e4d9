"""Convert a momentprop ONNX file for deployment: ONNX Runtime's mobile (ORT) format, float16, int8.

- ``precision="fp16"``: the **mean branch** (every node the ``mean`` output depends on) runs in float16; the nodes
  that only compute variances stay in float32, and so do the file's inputs and outputs. Weight variances of 1e-6
  and below underflow or lose their precision in float16, so the variance branch is never converted: variances
  stay non-negative and finite.
- ``precision="int8"``: dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``: int8 weights,
  activations quantised per call) of the matrix products with constant weights: those of the mean and of the
  variance branch, or with ``quantize_mean_only=True`` only those of the mean branch, or with
  ``quantize_variance_only=True`` only those of the variance-only branch (the mean stays float32, bit-exact).
- ``format="ort"``: ONNX Runtime's ORT format for its mobile and minimal builds (basic graph optimisations,
  which are the same on every platform, are applied before saving).

The model card travels with the file; ``momentprop.precision`` records the conversion.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import InputError, PersistenceError
from .card import CARD_PREFIX, read_model_card

FORMATS = ("onnx", "ort")
PRECISIONS = ("fp32", "fp16", "int8")


def load_momentprop_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file written by momentprop; refuse other files with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise PersistenceError(f"{path}: no such file; pass the path of a file written by cm.to_onnx(path)")
    if is_ort_format(path):
        raise PersistenceError(f"{path} is an ORT-format file, which cannot be converted again: convert the .onnx file "
                               "it came from")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise PersistenceError(f"{path}: not an ONNX file ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node or "version" not in model_card(model):
        raise PersistenceError(
            f"{path}: this ONNX file has no momentprop model card (metadata keys '{CARD_PREFIX}*'), so momentprop "
            "did not write it; convert a file exported with cm.to_onnx(path)"
        )
    return model


def is_ort_format(path: str | os.PathLike) -> bool:
    """ORT-format files are flatbuffers with the identifier "ORTM" at bytes 4-8."""
    with open(path, "rb") as f:
        return f.read(8)[4:8] == b"ORTM"


def model_card(model: onnx.ModelProto) -> dict[str, object]:
    return read_model_card({p.key: p.value for p in model.metadata_props})


def _set_card(model: onnx.ModelProto, key: str, value: str) -> None:
    for entry in model.metadata_props:
        if entry.key == CARD_PREFIX + key:
            entry.value = value
            return
    model.metadata_props.add(key=CARD_PREFIX + key, value=value)


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name (quantisation and the fp16 converter select nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def upstream(graph: onnx.GraphProto, outputs: set[str]) -> set[str]:
    """Names of the nodes that the values ``outputs`` depend on."""
    producer = {out: node for node in graph.node for out in node.output}
    found, stack = set(), list(outputs)
    while stack:
        value = stack.pop()
        node = producer.get(value)
        if node is None or node.name in found:
            continue
        found.add(node.name)
        stack.extend(node.input)
    return found


def branches(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Split the nodes into the mean branch (everything the ``mean`` output depends on; these nodes may feed the
    variance too, e.g. the activations at the mean) and the variance-only branch (the rest)."""
    _name_nodes(model.graph)
    outputs = {o.name for o in model.graph.output}
    if "mean" not in outputs:
        raise InputError(f"the file has no 'mean' output (outputs: {sorted(outputs)}); is it a momentprop file?")
    mean = upstream(model.graph, {"mean"})
    return {"mean": mean, "variance_only": {n.name for n in model.graph.node} - mean}


def op_counts(model: onnx.ModelProto) -> Counter:
    """Node counts by op type (``domain::op`` outside the default domain), local functions included."""
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in nodes)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs advice (pre-processing, opset) at WARNING on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The mean branch in float16; the variance-only nodes, the inputs and the outputs stay in float32.

    Every float value the mean branch computes is float16 inside it and cast back to float32 once, where a
    variance node or a graph output reads it; the weights the mean branch reads are stored in float16 (a weight
    the variance branch reads too keeps a float32 copy).
    """
    model = onnx.shape_inference.infer_shapes(onnx.ModelProto.FromString(model.SerializeToString()))
    graph = model.graph
    mean = branches(model)["mean"]
    fp32 = {v.name for v in (*graph.value_info, *graph.input, *graph.output)
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    fp32 |= {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    half = lambda name: f"{name}__fp16"  # noqa: E731
    initializers = {t.name: t for t in graph.initializer}
    added: list[onnx.NodeProto] = []
    for name in fp32 - {o for n in graph.node if n.name in mean for o in n.output}:  # inputs of the mean branch
        readers = [n for n in consumers.get(name, []) if n.name in mean]
        if not readers:
            continue
        if name in initializers:
            graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(initializers[name]).astype(np.float16), half(name)))
        else:
            added.append(
                helper.make_node("Cast", [name], [half(name)], name=f"{name}__to_fp16", to=onnx.TensorProto.FLOAT16)
            )
        for node in readers:
            node.input[:] = [half(i) if i == name else i for i in node.input]
    for node in [n for n in graph.node if n.name in mean]:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.FLOAT16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        for k, name in enumerate(node.output):
            if name not in fp32:
                continue
            node.output[k] = half(name)
            for reader in consumers.get(name, []):
                if reader.name in mean:
                    reader.input[:] = [half(i) if i == name else i for i in reader.input]
            if name in outputs or any(r.name not in mean for r in consumers.get(name, [])):
                added.append(
                    helper.make_node("Cast", [half(name)], [name], name=f"{name}__to_fp32", to=onnx.TensorProto.FLOAT)
                )
    graph.node.extend(added)
    _topological_sort(graph)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:], graph.value_info[:]
    graph.initializer.extend(keep)
    return model


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder the nodes so that each comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        for node in pending:
            if node not in rest:
                ordered.append(node)
                ready.update(node.output)
        if len(rest) == len(pending):
            raise InputError(f"the graph has a cycle or an undefined input at node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _gemm_to_matmul(model: onnx.ModelProto) -> None:
    """Rewrite ``Gemm(A, B, C)`` with constant B and C as ``MatMul(A, B') + C'`` (the MatMul keeps the Gemm's name):
    ONNX Runtime's dynamic quantisation handles MatMul, not Gemm."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b = node.input[1] if node.op_type == "Gemm" else None
        c = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        if b not in constants or (c and c not in constants) or attrs.get("transA", 0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(constants[b]) * np.float32(attrs.get("alpha", 1.0))
        weight = weight.T if attrs.get("transB", 0) else weight
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), f"{node.name}__weight"))
        product = node.output[0] if c is None else f"{node.name}__product"
        nodes.append(helper.make_node("MatMul", [node.input[0], f"{node.name}__weight"], [product], name=node.name))
        if c is not None:
            bias = numpy_helper.to_array(constants[c]) * np.float32(attrs.get("beta", 1.0))
            graph.initializer.append(numpy_helper.from_array(bias, f"{node.name}__bias"))
            nodes.append(
                helper.make_node("Add", [product, f"{node.name}__bias"], [node.output[0]], name=f"{node.name}__add")
            )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


INT8_BRANCHES = ("all", "mean", "variance")
QUANTISED_OPS = ("MatMul", "Conv")  # with a constant weight: MatMulInteger / ConvInteger after quantize_dynamic


def to_int8(model: onnx.ModelProto, branch: str = "all") -> onnx.ModelProto:
    """Dynamic int8 quantisation of the matrix products and convolutions with constant weights: all of them, or
    only the mean branch's, or only the variance-only branch's (the mean then stays bit-exact)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _name_nodes(model.graph)
    _gemm_to_matmul(model)
    selected = None
    if branch != "all":
        part = branches(model)["mean" if branch == "mean" else "variance_only"]
        selected = [n.name for n in model.graph.node if n.op_type in QUANTISED_OPS and n.name in part]
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(source))
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTISED_OPS),
                         nodes_to_quantize=selected)
        quantised = onnx.load(str(target))
    del quantised.metadata_props[:]
    quantised.metadata_props.extend(model.metadata_props)
    return quantised


def save_ort(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` in ONNX Runtime's ORT format (basic, platform-independent graph optimisations applied)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model.onnx"
        onnx.save(model, str(source))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        options.add_session_config_entry("session.save_model_format", "ORT")
        options.log_severity_level = 3
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def convert(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    format: str | None = None,
    precision: str = "fp32",
    quantize_mean_only: bool = False,
    quantize_variance_only: bool = False,
) -> Path:
    """Convert the momentprop file ``source`` and write it to ``target``; returns ``target``.

    ``format``: ``"onnx"`` or ``"ort"`` (ONNX Runtime mobile format); default: ``"ort"`` for a ``.ort`` target (ONNX
    Runtime reads a file by its suffix), else ``"onnx"``. ``precision``: ``"fp32"``, ``"fp16"`` (mean
    branch in float16, variances in float32) or ``"int8"`` (dynamic quantisation; ``quantize_mean_only`` keeps the
    variance branch in float32, ``quantize_variance_only`` the mean branch).
    """
    format = format or ("ort" if str(target).lower().endswith(".ort") else "onnx")
    if format not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {format!r}")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if quantize_mean_only and quantize_variance_only:
        raise InputError("quantize_mean_only and quantize_variance_only exclude each other (neither: every matrix "
                         "product in int8)")
    if quantize_variance_only and precision != "int8":
        raise InputError("quantize_variance_only applies to precision='int8' only")
    if quantize_mean_only and precision != "int8":
        raise InputError("quantize_mean_only applies to precision='int8' only (fp16 always keeps the variance branch "
                         "in float32)")
    model = load_momentprop_onnx(source)
    if model_card(model).get("precision", "fp32") != "fp32":
        raise InputError(f"{source} is already converted ({model_card(model)['precision']}); convert the float32 file")
    if precision == "fp16":
        model = to_fp16(model)
    elif precision == "int8":
        branch = "mean" if quantize_mean_only else "variance" if quantize_variance_only else "all"
        model = to_int8(model, branch)
        precision = precision if branch == "all" else f"int8-{branch}"
    _set_card(model, "precision", precision)
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if format == "ort":
            save_ort(model, target)
        else:
            onnx.save(model, str(target))
    except OSError as exc:
        raise PersistenceError(f"cannot write {target}: {exc}") from exc
    return target
