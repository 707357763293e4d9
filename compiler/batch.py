"""Batch scoring of tables: an exported file over Parquet or Arrow data, in chunks (the CLI's ``predict`` on a
table), and the same per-batch function for Ray Data's ``map_batches`` (one :class:`TablePredictor` per actor,
:func:`score_with_ray`).

A table's feature columns (all numeric columns, or those named) are the file's one input ``(batch, features)``; the
outputs come back as columns named like the file's outputs: a float column where an output has one entry per row,
else a fixed-size list column (``mean``, ``variance``, ``probs``; a covariance flattened row-major).  Needs
``pyarrow`` (``pip install 'momentprop[batch]'``); the progress bar is tqdm's where tqdm is installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .errors import InputError

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".arrow": "ipc", ".feather": "ipc", ".ipc": "ipc"}


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.dataset
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as exc:
        raise InputError("reading and writing Parquet or Arrow tables needs pyarrow: pip install "
                         "'momentprop[batch]'") from exc
    return pyarrow


def table_format(path: str | os.PathLike) -> str | None:
    """"parquet" or "ipc" for a table file (or a folder of them) by its suffix; None for anything else."""
    path = Path(path)
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.iterdir() if p.suffix.lower() in TABLE_SUFFIXES}
        return TABLE_SUFFIXES[suffixes.pop()] if len(suffixes) == 1 else None
    return TABLE_SUFFIXES.get(path.suffix.lower())


class TablePredictor:
    """``predictor(batch)``: a batch of table rows (a dict of numpy columns, as Ray Data's ``batch_format="numpy"``
    gives, or a ``pyarrow.RecordBatch``) → a dict of output columns.  Construct once per process or Ray actor: it
    loads the file into ONNX Runtime.

    Args:
        path: the exported file (``.onnx`` or ``.ort``); it must take one input ``(batch, features)``.
        columns: the feature columns, in the file's feature order (None: every numeric column, in table order).
        keep: columns passed through to the output unchanged (an id column, say).
        threads: ONNX Runtime intra-op threads (None: its default).
        provider, nan: as :class:`~momentprop.OnnxRunner`'s.
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] | None = None, keep: Sequence[str] = (),
                 threads: int | None = None, provider: str = "cpu", nan: str = "propagate"):
        from .onnx_runner import OnnxRunner

        self.runner = OnnxRunner(path, provider, threads, nan=nan)
        shape = self.runner.inputs[0].shape
        if len(self.runner.inputs) != 1 or len(shape) != 2 or not isinstance(shape[1], int):
            raise InputError(f"{path}: table scoring needs a file with one input of shape (batch, features); this "
                             f"one takes {[(i.name, i.shape) for i in self.runner.inputs]}")
        self.features = shape[1]
        self.columns = list(columns) if columns is not None else None
        self.keep = list(keep)

    def feature_matrix(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        names = self.columns if self.columns is not None else [
            n for n, v in batch.items() if n not in self.keep and np.asarray(v).dtype.kind in "fiub"]
        missing = [n for n in names if n not in batch]
        if missing:
            raise InputError(f"the table has no column(s) {missing}; its columns are {list(batch)}")
        if len(names) != self.features:
            raise InputError(f"the file takes {self.features} features per row, and the table gives {len(names)} "
                             f"feature column(s) {names[:20]}; name the feature columns (--columns a,b,c)")
        values = [np.asarray(batch[n]) for n in names]
        integer = [n for n, v in zip(names, values) if v.dtype.kind != "f"]
        if integer:  # the runner's dtype rule: integer values for a float input are refused, so say it per column
            raise InputError(f"feature column(s) {integer[:20]} are not floating point; cast them to float in the "
                             "table (a category code is not a measurement the model was trained on as is)")
        return np.stack(values, axis=1)

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        if hasattr(batch, "to_pydict") and hasattr(batch, "schema"):  # a pyarrow RecordBatch or Table
            batch = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.schema.names}
        outputs = self.runner(self.feature_matrix(batch))
        columns = {name: batch[name] for name in self.keep}
        for name, value in outputs.items():
            flat = value.reshape(len(value), -1)
            columns[name] = flat[:, 0] if flat.shape[1] == 1 else flat
        return columns


def score_with_ray(path: str | os.PathLike, dataset: Any, columns: Sequence[str] | None = None,
                   keep: Sequence[str] = (), actors: int = 2, threads_per_actor: int = 1,
                   rows_per_batch: int = 65_536) -> Any:
    """A Ray Data dataset scored with the exported file ``path``: ``dataset.map_batches`` over ``actors`` Ray actors,
    each holding one :class:`TablePredictor` (one ONNX Runtime session with ``threads_per_actor`` threads); lazy, as
    Ray Data is (write it with ``.write_parquet(folder)``, or iterate).  The actors share the dataset's blocks: read
    it in at least ``actors`` blocks (``ray.data.read_parquet(folder, override_num_blocks=...)``).  Needs
    ``pip install 'momentprop[ray]'``."""
    import ray.data

    return dataset.map_batches(
        TablePredictor, fn_constructor_args=(str(path), columns, keep, threads_per_actor), batch_format="numpy",
        batch_size=rows_per_batch, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads_per_actor,
    )


def _record_batches(source: str | os.PathLike, rows: int) -> tuple[int, Iterator]:
    pa = _pyarrow()
    fmt = table_format(source)
    if fmt is None:
        raise InputError(f"{source}: a table must be a Parquet (.parquet) or Arrow IPC (.arrow, .feather) file, or a "
                         "folder of them")
    dataset = pa.dataset.dataset(str(source), format=fmt)
    return dataset.count_rows(), dataset.to_batches(batch_size=rows)


def _arrow_columns(columns: Mapping[str, np.ndarray]):
    pa = _pyarrow()
    arrays = {}
    for name, value in columns.items():
        value = np.asarray(value)
        if value.ndim == 2:
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), value.shape[1])
        else:
            arrays[name] = pa.array(value)
    return pa.RecordBatch.from_pydict(arrays)


def predict_table(path: str | os.PathLike, source: str | os.PathLike, target: str | os.PathLike, *,
                  columns: Sequence[str] | None = None, keep: Sequence[str] = (), rows_per_batch: int = 65_536,
                  threads: int | None = None, provider: str = "cpu", nan: str = "propagate",
                  progress: bool = True) -> int:
    """Score every row of the table ``source`` (Parquet or Arrow IPC, a file or a folder) with the exported file
    ``path``, ``rows_per_batch`` rows at a time, and write the output columns (and the ``keep`` columns) to
    ``target`` (.parquet, or .arrow/.feather); returns the number of rows.  Memory stays at one chunk."""
    pa = _pyarrow()
    out_format = table_format(target) if Path(target).suffix else None
    if out_format is None:
        raise InputError(f"{target}: the output table must end in .parquet, .arrow or .feather")
    predictor = TablePredictor(path, columns, keep, threads, provider, nan)
    total, batches = _record_batches(source, rows_per_batch)
    bar = _progress(total, progress)
    writer, done = None, 0
    try:
        for batch in batches:
            if not batch.num_rows:
                continue
            record = _arrow_columns(predictor(batch))
            if writer is None:
                writer = (pa.parquet.ParquetWriter(str(target), record.schema) if out_format == "parquet"
                          else pa.ipc.new_file(str(target), record.schema))
            writer.write_batch(record) if out_format == "ipc" else writer.write_table(pa.Table.from_batches([record]))
            done += batch.num_rows
            bar.update(batch.num_rows)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if writer is None:
        raise InputError(f"{source}: the table has no rows")
    return done


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool):
    if not show:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="rows", unit_scale=True, desc="momentprop predict")
