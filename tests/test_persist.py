"""Saving and loading compiled models and posteriors: exact round trips, no pickle, clear errors on foreign files."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import momentprop as mp
from momentprop import persist
from momentprop.errors import MomentpropError, PersistenceError
from momentprop.structures import Dense, FullCovariance, Kron
from momentprop.options import Options
from momentprop.options import CompiledInfo
from oracles import make_mlp, random_posterior


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, 3),
    ).eval()


CASES = {
    "diag": (lambda: make_mlp([6, 16, 4], nn.Tanh), (3, 6), {}),
    "full-classification": (lambda: make_mlp([6, 16, 4], nn.Tanh), (3, 6),
                            {"covariance": "full", "likelihood": "classification", "variance_scale": 0.4}),
    "regression-noise": (lambda: make_mlp([6, 16, 2]), (2, 6),
                         {"likelihood": "regression", "sigma_noise": 0.3, "variance_scale": 2.5}),
    "output-covariance-batch1": (_bn_model, (1, 3, 4),
                                 {"likelihood": "classification", "output_covariance": True, "variance_scale": 1.7}),
    "bridge-input-variance": (lambda: make_mlp([6, 16, 4]), (3, 6),
                              {"likelihood": "classification", "link": "bridge", "input_variance": True}),
}


def _compile(case: str) -> mp.CompiledModel:
    build, shape, kwargs = CASES[case]
    model = build()
    return mp.compile(model, random_posterior(model, 1e-2), (torch.randn(shape),), **kwargs)


def _loaders():
    yield (lambda cm, path: cm.save(path)), mp.load


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_the_same_outputs_at_new_batch_sizes(tmp_path, case):
    cm = _compile(case)
    for i, (save, load) in enumerate(_loaders()):
        path = save(cm, tmp_path / f"sub{i}" / "model.mpz")
        assert path.is_file()
        loaded = load(path)
        assert isinstance(loaded, mp.CompiledModel)
        assert loaded.info == cm.info
        assert loaded.variance_scale == cm.variance_scale
        assert [(x.shape, x.dtype) for x in loaded.example_inputs] == [(x.shape, x.dtype) for x in cm.example_inputs]
        for batch in (1, 7):
            xs = [torch.rand(batch, *x.shape[1:]) for x in cm.example_inputs]
            for got, want in zip(loaded(*xs), cm(*xs)):
                assert torch.equal(got, want)
            if cm.likelihood is not None:
                torch.testing.assert_close(loaded.predict(*xs), cm.predict(*xs), rtol=0, atol=0)


def test_calibrated_scale_is_saved(tmp_path):
    cm = _compile("full-classification")
    cm.program.state_dict["variance_scale"].fill_(3.25)  # what cm.calibrate does
    loaded = mp.load(cm.save(tmp_path / "m.mpz"))
    assert loaded.variance_scale == 3.25
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x)[1], cm(x)[1])


class _WithConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("variance_scale", torch.tensor(2.0))
        self.register_buffer("k", torch.arange(3.0), persistent=False)

    def forward(self, x):
        return x * self.k, x * x * self.variance_scale * torch.tensor([1.0, 2.0, 3.0])


def test_lifted_constants_and_non_persistent_buffers_round_trip(tmp_path):
    x = torch.randn(2, 3)
    program = torch.export.export(_WithConstants(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert set(program.constants) == {"k", "lifted_tensor_0"}
    cm = mp.CompiledModel(program, CompiledInfo(Options(), [], ["x"]), (x,))
    loaded = mp.load(cm.save(tmp_path / "c.mpz"))
    y = torch.randn(6, 3)
    for got, want in zip(loaded(y), cm(y)):
        assert torch.equal(got, want)


def test_loaded_model_exports_to_onnx(tmp_path):
    cm = _compile("full-classification")
    loaded = mp.load(cm.save(tmp_path / "m.mpz"))
    out = mp.OnnxRunner(loaded.to_onnx(tmp_path / "m.onnx"))(x := torch.randn(5, 6))
    mean, cov = cm(x)
    assert list(out) == ["mean", "covariance", "probs"]
    np.testing.assert_allclose(out["mean"], mean.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["covariance"], cov.numpy(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(out["probs"], cm.predict(x).numpy(), rtol=1e-4, atol=1e-7)


def test_file_is_plain_safetensors_and_loads_without_unpickling(tmp_path, monkeypatch):
    cm = _compile("regression-noise")
    data = cm.save(tmp_path / "m.mpz").read_bytes()
    # safetensors layout: u64 header length, a JSON header, then raw tensor bytes exactly covered by the header
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    metadata = header.pop("__metadata__")
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["momentprop.format"] == "momentprop"
    spans = sorted(tuple(entry["data_offsets"]) for entry in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(data) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert b"\x80\x04\x95" not in data[: 8 + n] and not data.startswith(b"PK")

    def refuse(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)
    x = torch.randn(4, 6)
    for got, want in zip(mp.load(tmp_path / "m.mpz")(x), cm(x)):
        assert torch.equal(got, want)


def _foreign_files(tmp_path, ours):
    data = ours.read_bytes()
    files = {
        "random bytes": os.urandom(2000),
        "empty": b"",
        "json": json.dumps({"covariance": "diag", "graph": {}}).encode(),
        "truncated tensors": data[: len(data) - 10],
        "truncated header": data[:100],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    save_file({"weight": torch.randn(3, 3)}, str(tmp_path / "other safetensors"), metadata={"format": "pt"})
    return [tmp_path / name for name in [*files, "other safetensors"]]


def test_foreign_or_truncated_files_raise_a_clear_error(tmp_path):
    ours = _compile("diag").save(tmp_path / "m.mpz")
    loaders = [mp.load, persist.load_posterior]
    loaders += [getattr(mp, name) for name in ("load", "load_posterior") if hasattr(mp, name)]
    for path in _foreign_files(tmp_path, ours):
        for load in loaders:
            with pytest.raises(PersistenceError, match="not a momentprop file|truncated") as info:
                load(path)
            assert isinstance(info.value, MomentpropError) and isinstance(info.value, ValueError)
    if hasattr(mp, "PersistenceError"):
        assert mp.PersistenceError is PersistenceError
    with pytest.raises(PersistenceError, match="no such file"):
        mp.load(tmp_path / "missing.mpz")


def _rewrite_metadata(path, **changes):
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**metadata, **{f"momentprop.{k}": v for k, v in changes.items()}})


def test_wrong_kind_newer_version_and_corrupt_graph_are_reported(tmp_path):
    model_path = _compile("diag").save(tmp_path / "m.mpz")
    posterior_path = persist.save_posterior({"w": torch.ones(2)}, tmp_path / "p.mpp")
    with pytest.raises(PersistenceError, match="load_posterior"):
        mp.load(posterior_path)
    with pytest.raises(PersistenceError, match="load_compiled"):
        persist.load_posterior(model_path)
    _rewrite_metadata(posterior_path, format_version="99")
    with pytest.raises(PersistenceError, match="version '99'"):
        persist.load_posterior(posterior_path)
    _rewrite_metadata(model_path, graph='{"graph_module": 1}')
    with pytest.raises(PersistenceError, match="moment graph is corrupt"):
        mp.load(model_path)


def _posterior_io():
    yield persist.save_posterior, persist.load_posterior
    if hasattr(mp, "save_posterior") and hasattr(mp, "load_posterior"):
        yield mp.save_posterior, mp.load_posterior


def test_diagonal_posterior_round_trip_compiles_to_the_same_model(tmp_path):
    model = make_mlp([6, 16, 4], nn.Tanh)
    flat = torch.rand(sum(p.numel() for p in model.parameters())) * 1e-2
    posterior, offset = {}, 0
    for name, p in model.named_parameters():  # views of one vector: shared storage must still save
        posterior[name] = flat[offset: offset + p.numel()].view(p.shape)
        offset += p.numel()
    posterior["0.bias"] = posterior["0.bias"].double()
    x = torch.randn(5, 6)
    want = mp.compile(model, posterior, (x,))(x)
    for i, (save, load) in enumerate(_posterior_io()):
        loaded = load(save(posterior, tmp_path / f"p{i}.mpp"))
        assert list(loaded) == list(posterior)
        for name, value in posterior.items():
            assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value)
        for got, ref in zip(mp.compile(model, loaded, (x,))(x), want):
            assert torch.equal(got, ref)


def _psd(n: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (1e-3 * a @ a.T / n).to(dtype)


def test_structured_posterior_round_trip_compiles_to_the_same_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    model = make_mlp([6, 16, 4], nn.Tanh)
    # contiguous like every loaded tensor (qr returns column-major factors: other strides, other roundoff)
    posterior = {
        "0.weight": Kron(torch.linalg.qr(torch.randn(16, 16, generator=g))[0].contiguous(),
                         torch.linalg.qr(torch.randn(6, 6, generator=g))[0].contiguous(),
                         1e-3 * torch.rand(16, 6, generator=g)),
        "0.bias": FullCovariance(_psd(16, g)),
        "2.weight": Dense(_psd(4 * 17, g, torch.float64).reshape(4, 17, 4, 17), with_bias=True),
        "2.bias": 1e-3 * torch.rand(4, generator=g),
    }
    x = torch.randn(5, 6)
    want = mp.compile(model, posterior, (x,), covariance="full")(x)
    for i, (save, load) in enumerate(_posterior_io()):
        loaded = load(save(posterior, tmp_path / f"s{i}.mpp"))
        assert list(loaded) == list(posterior)
        for name, value in posterior.items():
            assert type(loaded[name]) is type(value)
            if isinstance(value, torch.Tensor):
                assert torch.equal(loaded[name], value)
                continue
            for field in dataclasses.fields(value):
                got, item = getattr(loaded[name], field.name), getattr(value, field.name)
                if isinstance(item, torch.Tensor):
                    assert got.dtype == item.dtype and torch.equal(got, item)
                else:
                    assert type(got) is type(item) and got == item
        for got, ref in zip(mp.compile(model, loaded, (x,), covariance="full")(x), want):
            assert torch.equal(got, ref)


def test_unsavable_posteriors_are_refused(tmp_path):
    with pytest.raises(PersistenceError, match="dict"):
        persist.save_posterior(torch.ones(3), tmp_path / "p.mpp")
    with pytest.raises(PersistenceError, match="'w'"):
        persist.save_posterior({"w": [1.0, 2.0]}, tmp_path / "p.mpp")
