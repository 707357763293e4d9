"""Scoring Parquet and Arrow tables in chunks (`momentprop predict TABLE -o OUT`, momentprop.batch); oracle: a
plain onnxruntime.InferenceSession on the feature matrix."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.feather
import pyarrow.parquet as pq
import pytest
import torch

import momentprop as mp
from momentprop.batch import TablePredictor
from momentprop.cli import main
from oracles import make_mlp, random_posterior

FEATURES = [f"x{i}" for i in range(5)]
ROWS = 1000


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    model = make_mlp([5, 16, 3], torch.nn.Tanh)
    cm = mp.compile(model, random_posterior(model, 1e-3), (torch.randn(3, 5),), likelihood="classification",
                    covariance="diag")
    return cm.to_onnx(folder / "clf.onnx")


def table(seed: int = 0, rows: int = ROWS) -> pa.Table:
    x = np.random.default_rng(seed).standard_normal((rows, 5)).astype(np.float32)
    # columns out of the model's order, plus an id, so the test sees that --columns orders them
    reordered = {name: x[:, i] for i, name in reversed(list(enumerate(FEATURES)))}
    columns = {"id": np.arange(rows) + seed * rows, **reordered}
    return pa.table(columns)


def expected(path, t: pa.Table) -> dict[str, np.ndarray]:
    x = np.stack([t.column(name).to_numpy() for name in FEATURES], 1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))


@pytest.mark.parametrize("output", ["out.parquet", "out.arrow"])
def test_a_parquet_folder_is_scored_in_chunks(exported, tmp_path, output):
    parts = [table(seed) for seed in range(3)]
    (tmp_path / "data").mkdir()
    for i, part in enumerate(parts):
        pq.write_table(part, tmp_path / "data" / f"part{i}.parquet")
    argv = ["predict", str(exported), str(tmp_path / "data"), "-o", str(tmp_path / output), "--columns",
            ",".join(FEATURES), "--keep", "id", "--rows-per-batch", "256", "--no-progress"]
    assert main(argv) == 0
    result = pq.read_table(tmp_path / output) if output.endswith(".parquet") else pa.feather.read_table(
        tmp_path / output)
    assert result.column_names == ["id", "mean", "variance", "probs"] and result.num_rows == 3 * ROWS
    order = np.argsort(result.column("id").to_numpy())
    whole = pa.concat_tables(parts)
    for name, value in expected(exported, whole).items():
        got = np.stack(result.column(name).to_numpy(zero_copy_only=False))[order]
        np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-7)


def test_table_predictor_takes_ray_style_numpy_batches(exported):
    t = table()
    batch = {name: t.column(name).to_numpy() for name in t.column_names}
    out = TablePredictor(exported, FEATURES, keep=["id"])(batch)
    np.testing.assert_array_equal(out["id"], batch["id"])
    for name, value in expected(exported, t).items():
        np.testing.assert_allclose(out[name], value, rtol=1e-6, atol=1e-7)


def test_table_errors_say_what_to_do(exported, tmp_path, capsys):
    t = table(rows=10)
    pq.write_table(t, tmp_path / "t.parquet")
    pq.write_table(t.append_column("y", pa.array(np.ones(10, np.float32))), tmp_path / "wide.parquet")
    pq.write_table(pa.table({name: np.arange(10) for name in FEATURES}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({name: np.where(np.arange(10) == 7, np.nan, 1.0) for name in FEATURES}),
                   tmp_path / "nan.parquet")
    cases = [
        (["predict", str(exported), str(tmp_path / "t.parquet")], "needs -o OUTPUT"),
        # every numeric column by default: the id makes 6, so the error asks for --columns
        (["predict", str(exported), str(tmp_path / "t.parquet"), "-o", str(tmp_path / "o.parquet")], "--columns"),
        (["predict", str(exported), str(tmp_path / "wide.parquet"), "-o", str(tmp_path / "o.parquet"), "--keep",
          "id"], "gives 6 feature column(s)"),
        (["predict", str(exported), str(tmp_path / "ints.parquet"), "-o", str(tmp_path / "o.parquet")],
         "not floating point"),
        (["predict", str(exported), str(tmp_path / "t.parquet"), "-o", str(tmp_path / "o.csv"), "--columns",
          ",".join(FEATURES)], "must end in .parquet"),
        # the runner's options reach the table path
        (["predict", str(exported), str(tmp_path / "nan.parquet"), "-o", str(tmp_path / "o.parquet"), "--nan",
          "raise"], "rows [7]"),
        (["predict", str(exported), str(tmp_path / "t.parquet"), "-o", str(tmp_path / "o.parquet"), "--columns",
          ",".join(FEATURES), "--provider", "cuda"] if "CUDAExecutionProvider" not in ort.get_available_providers()
         else [], "CUDA"),
    ]
    for argv, message in (case for case in cases if case[0]):
        assert main(argv + ["--no-progress"]) == 1, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.slow  # starts a local Ray cluster (about 10 s) and scores 1M rows
def test_ray_data_scores_a_million_rows_as_one_process_does(exported, tmp_path):
    ray = pytest.importorskip("ray")
    from momentprop.batch import score_with_ray

    rows = 1_000_000
    x = np.random.default_rng(1).standard_normal((rows, 5)).astype(np.float32)
    (tmp_path / "data").mkdir()
    for i, part in enumerate(np.array_split(np.arange(rows), 4)):
        pq.write_table(pa.table({"id": part, **{name: x[part, j] for j, name in enumerate(FEATURES)}}),
                       tmp_path / "data" / f"part{i}.parquet")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        dataset = ray.data.read_parquet(str(tmp_path / "data"), override_num_blocks=8)
        score_with_ray(exported, dataset, FEATURES, ["id"], actors=2).write_parquet(str(tmp_path / "out"))
    finally:
        ray.shutdown()
    result = pq.read_table(tmp_path / "out")
    assert result.num_rows == rows
    order = np.argsort(result.column("id").to_numpy())
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
    for name, value in reference.items():
        got = np.stack(result.column(name).to_numpy(zero_copy_only=False))[order]
        np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-7)
