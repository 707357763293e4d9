"""Write the image page's model: a Fashion-MNIST LeNet-5 with a last-layer Laplace posterior, compiled with momentprop.

    python web/make_image_model.py          # writes web/fashion_lenet.onnx, .ort, .int8.onnx and fashion_samples.json

LeNet-5 (two 5x5 convs with max pooling, 400-120-84-10) takes raw pixels in [0, 1] as ``(N, 1, 28, 28)`` (the
standardisation is the model's first op, so the page needs no constants); Adam for ``epochs`` epochs on ``train``
Fashion-MNIST images (Debian's dataset-fashion-mnist), then laplace-torch's Kronecker Laplace over the last layer with
the prior precision tuned by marginal likelihood, compiled with momentprop's defaults for it (laplace-torch's GLM
predictive, full covariance of the 10 logits, probit class probabilities).  The ORT-format and int8 files come from
``momentprop.convert``; their sizes and accuracy against the float32 file are printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import momentprop as mp

HERE = Path(__file__).resolve().parent
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class Standardise(nn.Module):
    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def lenet(mean: float, std: float) -> nn.Sequential:
    return nn.Sequential(Standardise(mean, std), nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                         nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def fashion_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as float pixels in [0, 1], ``(N, 1, 28, 28)``, and labels."""
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.evaluate.data import load_fashion_mnist

    x_train, y_train, x_test, y_test = load_fashion_mnist()
    image = lambda a: torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0  # noqa: E731
    label = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return image(x_train), label(y_train), image(x_test), label(y_test)


def write(folder: Path, train: int = 20_000, epochs: int = 3, samples: int = 12, seed: int = 0) -> dict[str, object]:
    """Train, fit, compile and export into ``folder``; returns the facts the README quotes."""
    import laplace
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = fashion_images()
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:train]
    x, y = x_train[order], y_train[order]
    model = lenet(float(x.mean()), float(x.std()))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(128):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    model.eval()
    la = laplace.Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=256))
    la.optimize_prior_precision(method="marglik")
    cm = mp.compile(model, la, (x[:2],))
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = cm.to_onnx(folder / "fashion_lenet.onnx")
    ort_path = mp.convert(onnx_path, folder / "fashion_lenet.ort")
    int8_path = mp.convert(onnx_path, folder / "fashion_lenet.int8.onnx", precision="int8")
    # the page's sample images: the first test image of each class, then the first few others
    picks = [int((y_test == c).nonzero()[0]) for c in range(10)][:samples]
    samples_json = {"classes": CLASSES, "images": x_test[picks].reshape(len(picks), -1).tolist(),
                    "labels": [int(y_test[i]) for i in picks]}
    (folder / "fashion_samples.json").write_text(json.dumps(samples_json))
    test = x_test[:2000].numpy()
    probs = {p.name: mp.OnnxRunner(p)(test)["probs"] for p in (onnx_path, ort_path, int8_path)}
    reference = probs[onnx_path.name]
    return {
        "accuracy": float((reference.argmax(1) == y_test[:2000].numpy()).mean()),
        "prior_precision": float(la.prior_precision.reshape(-1)[0]),
        "files": {name: {"bytes": (folder / name).stat().st_size,
                         "max_prob_error": float(np.abs(p - reference).max()),
                         "accuracy": float((p.argmax(1) == y_test[:2000].numpy()).mean())}
                  for name, p in probs.items()},
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(write(HERE), indent=2))
