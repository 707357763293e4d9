"""Test oracles and model builders shared by the tests (``from oracles import ...``): random MLPs, random diagonal
posteriors, the Monte Carlo oracle over the weight posterior, and an independent float64 reference propagation."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call


def make_mlp(sizes: list[int], activation: Callable[[], nn.Module] | None = nn.ReLU, seed: int = 0) -> nn.Sequential:
    """An MLP ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between linear layers (None: purely linear)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if activation is not None and i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).eval()


def random_posterior(model: nn.Module, scale: float = 1e-3, seed: int = 0, names=None) -> dict[str, torch.Tensor]:
    """Diagonal variances, uniform in ``[0.5, 1.5] * scale``, for ``names`` (default: every parameter)."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: scale * (0.5 + torch.rand(p.shape, generator=g))
        for n, p in model.named_parameters()
        if names is None or n in names
    }


@torch.no_grad()
def monte_carlo(
    model: nn.Module,
    posterior: dict[str, torch.Tensor],
    x: torch.Tensor,
    n_samples: int = 20_000,
    seed: int = 0,
    chunk: int = 2_000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and covariance (over the last dim) of ``model(x)`` with weights drawn from
    ``N(params, diag(posterior))``, in float64."""
    model = copy.deepcopy(model).double()
    x = x.double() if x.is_floating_point() else x
    params = {n: p.detach() for n, p in model.named_parameters()}
    std = {n: v.double().sqrt() for n, v in posterior.items()}
    g = torch.Generator().manual_seed(seed)
    total = total_outer = None
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        sampled = {
            n: p.expand(k, *p.shape)
            + (std[n] * torch.randn((k, *p.shape), generator=g, dtype=torch.float64) if n in std else 0)
            for n, p in params.items()
        }
        out = torch.func.vmap(lambda ps: functional_call(model, ps, (x,)))(sampled)
        s, so = out.sum(0), torch.einsum("s...i,s...j->...ij", out, out)
        total = s if total is None else total + s
        total_outer = so if total_outer is None else total_outer + so
        done += k
    mean = total / n_samples
    cov = total_outer / n_samples - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    cov = cov * n_samples / (n_samples - 1)
    return mean, torch.diagonal(cov, dim1=-2, dim2=-1), cov


class TokenEmbedding(nn.Module):
    """An embedding table applied to integer ids."""

    def __init__(self, vocabulary: int = 10, dim: int = 4):
        super().__init__()
        self.table = nn.Embedding(vocabulary, dim)

    def forward(self, ids):
        return self.table(ids)


# ---------------------------------------------------------------------------------------------------------------
# Independent reference propagation (float64): the paper's equations written out with einsum, derivatives of
# activations by autograd.  Used by tests/passes/* as the oracle for the compiled rules; shares no code with them.
# ---------------------------------------------------------------------------------------------------------------


class Gaussian:
    """A reference moment in float64: ``var`` is the variance shaped like ``mean`` (diag) or the covariance over
    the last dim, shaped ``mean.shape + (C,)`` (full)."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, full: bool):
        self.mean, self.var, self.full = mean.double(), var.double(), full

    @classmethod
    def constant(cls, x: torch.Tensor, full: bool) -> "Gaussian":
        x = x.double()
        return cls(x, torch.zeros(*x.shape, x.shape[-1], dtype=x.dtype) if full else torch.zeros_like(x), full)

    def variance(self) -> torch.Tensor:
        return torch.diagonal(self.var, dim1=-2, dim2=-1) if self.full else self.var

    def to_full(self) -> "Gaussian":
        return self if self.full else Gaussian(self.mean, torch.diag_embed(self.var), True)


def _as64(t):
    return None if t is None else t.detach().double()


def ref_linear(g: Gaussian, weight, bias=None, weight_var=None, bias_var=None) -> Gaussian:
    """``h = a W^T + b`` (torch layout, W: (out, in)) for ``a ~ g`` independent of W, b (elementwise variances).

    diag: Var h = m^2 S^T + v (M^2 + S)^T + s_b
    full: Cov h = M Sigma M^T + diag((m^2 + diag Sigma) S^T + s_b)
    """
    M, S, b, s_b = _as64(weight), _as64(weight_var), _as64(bias), _as64(bias_var)
    m = g.mean
    mean = torch.einsum("...i,oi->...o", m, M) + (0 if b is None else b)
    elementwise = torch.zeros_like(mean)
    if S is not None:
        elementwise = elementwise + torch.einsum("...i,oi->...o", m * m + g.variance(), S)
    if s_b is not None:
        elementwise = elementwise + s_b
    if not g.full:
        return Gaussian(mean, elementwise + torch.einsum("...i,oi->...o", g.var, M * M), False)
    cov = torch.einsum("oi,...ij,pj->...op", M, g.var, M) + torch.diag_embed(elementwise)
    return Gaussian(mean, cov, True)


def derivative(fn: Callable, m: torch.Tensor) -> torch.Tensor:
    """f'(m) of an elementwise function, by autograd in float64."""
    m = m.detach().double().clone().requires_grad_(True)
    (d,) = torch.autograd.grad(fn(m).sum(), m)
    return d.detach()


def ref_elementwise(g: Gaussian, fn: Callable) -> Gaussian:
    """Local linearisation at the mean: mean f(m), variance f'(m)^2 v (full: J Sigma J, J = diag f'(m))."""
    with torch.no_grad():
        mean = fn(g.mean)
    d = derivative(fn, g.mean)
    if not g.full:
        return Gaussian(mean, d * d * g.var, False)
    return Gaussian(mean, d.unsqueeze(-1) * d.unsqueeze(-2) * g.var, True)


def ref_sequential(model: nn.Module, posterior: dict, g: Gaussian, prefix: str = "") -> Gaussian:
    """Reference moments through an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise modules."""
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            g = ref_linear(
                g, layer.weight, layer.bias,
                posterior.get(f"{prefix}{name}.weight"), posterior.get(f"{prefix}{name}.bias"),
            )
        elif isinstance(layer, (nn.Dropout, nn.Identity)):
            continue
        else:
            g = ref_elementwise(g, copy.deepcopy(layer).double())
    return g


def assert_moments_close(mean, var, ref: Gaussian, rtol: float = 1e-4, atol_scale: float = 1e-5) -> None:
    """Compiled (float32) moments against a float64 reference: relative ``rtol``, absolute tolerance
    ``atol_scale`` times the largest reference (co)variance (off-diagonal entries may be ~0)."""
    assert var.shape == ref.var.shape, f"(co)variance shape {tuple(var.shape)} != reference {tuple(ref.var.shape)}"
    mean_scale = max(ref.mean.abs().max().item(), 1e-12)
    torch.testing.assert_close(mean.double(), ref.mean, rtol=rtol, atol=atol_scale * mean_scale)
    scale = max(ref.var.abs().max().item(), 1e-30)
    torch.testing.assert_close(var.double(), ref.var, rtol=rtol, atol=atol_scale * scale)


def assert_symmetric_psd(cov: torch.Tensor, rel_tol: float = 1e-5) -> None:
    """Covariances over the last dim: symmetric, eigenvalues >= -rel_tol * largest, nonnegative variances."""
    cov = cov.double()
    scale = cov.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(cov, cov.mT, rtol=0, atol=1e-6 * scale.max().item())
    eig = torch.linalg.eigvalsh(0.5 * (cov + cov.mT))
    assert (eig >= -rel_tol * scale.squeeze(-1)).all(), f"not PSD: min eigenvalue {eig.min().item():.3g}"
    assert (torch.diagonal(cov, dim1=-2, dim2=-1) >= 0).all()


def compiled_moments(model: nn.Module, posterior, x: torch.Tensor, covariance: str = "diag", **kwargs):
    """``mp.compile(...)(x)``: the compiled mean and (co)variance of ``model`` at ``x``."""
    import momentprop as mp

    return mp.compile(model, posterior, example_inputs=(x,), covariance=covariance, **kwargs)(x)


class Source(nn.Module):
    """An exactly Gaussian random tensor with correlated features: ``bayes`` (a Linear meant to be random, on a
    deterministic input) then ``mix`` (a deterministic Linear scaled by ``gain``, plus ``offset`` on its bias).
    Works on inputs of any rank (features last)."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 8, gain: float = 1.0, offset: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.bayes = nn.Linear(d_in, hidden)
        self.mix = nn.Linear(hidden, d_out)
        with torch.no_grad():
            self.mix.weight.mul_(gain)
            self.mix.bias.mul_(gain).add_(offset)

    def forward(self, x):
        return self.mix(self.bayes(x))

    def reference(self, x: torch.Tensor, posterior: dict, prefix: str, full: bool) -> Gaussian:
        """The reference moments of ``self(x)``; ``prefix`` is this module's name in the compiled model + '.'."""
        g = Gaussian.constant(x, full)
        g = ref_linear(
            g, self.bayes.weight, self.bayes.bias,
            posterior.get(prefix + "bayes.weight"), posterior.get(prefix + "bayes.bias"),
        )
        return ref_linear(
            g, self.mix.weight, self.mix.bias, posterior.get(prefix + "mix.weight"), posterior.get(prefix + "mix.bias")
        )


def source_posterior(model: nn.Module, scale: float = 1e-2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random posterior on the ``bayes`` layers of every :class:`Source` in ``model``; everything else fixed."""
    names = {n for n, _ in model.named_parameters() if "bayes" in n.split(".")}
    return random_posterior(model, scale=scale, seed=seed, names=names)


# ---- convolutional networks (the architectures of the convolution issue), images (B, C, 16, 16) -----------------


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class _UNet(nn.Module):
    """Down by max pooling and a strided conv, up by nearest and bilinear upsampling, skip by concatenation."""

    def __init__(self):
        super().__init__()
        self.down1, self.down2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.up, self.out = nn.Conv2d(8 + 4, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        skip = torch.relu(self.down1(x))
        h = torch.relu(self.down2(nn.functional.max_pool2d(skip, 2)))
        h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        h = nn.functional.interpolate(h, size=skip.shape[-2:], mode="bilinear")
        h = torch.relu(self.up(torch.cat([h, skip], 1)))
        return self.out(h).mean((2, 3))


class _InvertedResidual(nn.Module):
    """An EfficientNet-Lite (MBConv) block: 1x1 expansion, padded depthwise 3x3, 1x1 projection, each with batch
    norm, ReLU6 between, and the skip."""

    def __init__(self, channels: int, expanded: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.ReLU6(),
            nn.ZeroPad2d(1), nn.Conv2d(expanded, expanded, 3, groups=expanded, bias=False), nn.BatchNorm2d(expanded),
            nn.ReLU6(), nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.body(x)


class _SharedNorm(nn.Module):
    """One batch norm applied to two branches, added before the next convolution (its noise reaches both)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.bn, self.conv3, self.head = nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3), nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.conv3(torch.relu(self.bn(self.conv1(x))) + self.bn(self.conv2(x))).mean((2, 3)))


def make_cnn(name: str, seed: int = 0) -> nn.Module:
    """``lenet``, ``resnet`` (skips, batch norm, global average pooling), ``unet``, ``mobile`` (depthwise +
    pointwise, ReLU6, padding, group norm), ``conv1d`` (a sequence of 16 steps, dilated); and ``mbconv``
    (EfficientNet-Lite's blocks) and ``shared_norm`` (one batch norm on two branches)."""
    torch.manual_seed(seed)
    if name == "lenet":
        model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                              nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 24), nn.ReLU(),
                              nn.Linear(24, 10))
    elif name == "resnet":
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), _ResidualBlock(8),
                              nn.Conv2d(8, 16, 3, stride=2), _ResidualBlock(16), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(16, 10))
    elif name == "unet":
        model = _UNet()
    elif name == "mobile":
        model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 8, 3, stride=2), nn.Hardtanh(0, 6),
                              nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.GroupNorm(2, 8), nn.Hardtanh(0, 6),
                              nn.Conv2d(8, 16, 1), nn.InstanceNorm2d(16, affine=True), nn.AdaptiveAvgPool2d(2),
                              nn.Flatten(), nn.Linear(64, 10))
    elif name == "conv1d":
        model = nn.Sequential(nn.Conv1d(3, 8, 3, dilation=2), nn.Tanh(), nn.ConvTranspose1d(8, 4, 2, stride=2),
                              nn.AvgPool1d(2), nn.Flatten(), nn.Linear(4 * 12, 5))
    elif name == "mbconv":
        model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                              _InvertedResidual(8, 16), _InvertedResidual(8, 24), nn.Conv2d(8, 16, 1, bias=False),
                              nn.BatchNorm2d(16), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(16, 10))
    elif name == "shared_norm":
        model = _SharedNorm()
    else:
        raise ValueError(name)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                if name in ("mbconv", "shared_norm"):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def cnn_input(name: str, batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    shape = (batch, 3, size) if name == "conv1d" else (batch, 1, size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class _Skip(nn.Module):
    """``x + body(x)`` (a residual connection; the body keeps the shape)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class _Concat(nn.Module):
    """``cat([x, body(x)], channels)`` (a U-Net's skip; the body keeps the spatial size)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class _Reduce(nn.Module):
    """``x.sum(dims)`` (a reduction over dims other than the trailing ones, flattened after)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.sum(self.dims).flatten(1)


def kron_factors(parameter: torch.Tensor, seed: int, scale: float = 1e-3):
    """Random Kronecker factors (``mp.Kron``) for ``parameter``, as laplace-torch factors a weight or a kernel:
    ``out x (in · k...)``, random orthogonal eigenvectors and eigenvalues in ``[0, scale)``."""
    import momentprop as mp

    g = torch.Generator().manual_seed(seed)
    out, n = parameter.shape[0], parameter[0].numel()
    q_out = torch.linalg.qr(torch.randn(out, out, generator=g))[0]
    q_in = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    return mp.Kron(q_out, q_in, scale * torch.rand(out, n, generator=g))


def kron_posterior(model: nn.Module, scale: float = 1e-3, seed: int = 0) -> dict:
    """Kronecker factors on every linear weight and every ungrouped, not transposed convolution kernel (where the
    rules keep the structure), seeded variances on every other parameter."""
    posterior = random_posterior(model, scale, seed=seed)
    for i, (name, module) in enumerate(model.named_modules()):
        conv = isinstance(module, nn.modules.conv._ConvNd)
        if isinstance(module, nn.Linear) or (conv and module.groups == 1 and not module.transposed):
            key = f"{name}.weight" if name else "weight"
            posterior[key] = kron_factors(module.weight, seed * 1000 + i, scale)
    return posterior


def random_cnn(seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A seeded random convolutional network for 1-d, 2-d or 3-d images and its input shape (without the batch):
    2-4 layers drawn from convolutions (stride, padding, dilation, groups, transposed), activations,
    batch, group and instance norm, max and average pooling, padding, upsampling, residual and concatenating skips;
    then a global average pool, or a sum over the channels and the first spatial dim, and a linear head of 3
    outputs."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    dims = pick([1, 2, 2, 3])
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    convt_cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    norm_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    torch.manual_seed(seed)
    channels, size, layers = 2, 9 if dims < 3 else 5, []
    for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
        kind = pick(["conv", "conv", "transposed", "norm", "pool", "pad", "upsample", "skip", "concat"])
        if kind == "conv" or size < 4 or (kind == "transposed" and convt_cls is None):
            out = pick([2, 4])
            groups = pick([1, 2]) if out % 2 == 0 and channels % 2 == 0 else 1
            stride, dilation = pick([1, 1, 2]), pick([1, 2])
            kernel = pick([1, 2, 3])
            padding = pick([0, 1])
            if size + 2 * padding - dilation * (kernel - 1) < 1:
                padding = kernel
            layers += [conv_cls(channels, out, kernel, stride, padding, dilation, groups), pick(
                [nn.ReLU(), nn.Tanh(), nn.Hardtanh(0, 6), nn.Identity()])]
            size, channels = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1, out
        elif kind == "transposed":
            stride = pick([1, 2])
            layers += [convt_cls(channels, 2, 2, stride, output_padding=stride - 1), nn.Tanh()]
            size, channels = (size - 1) * stride + 2 + stride - 1, 2
        elif kind == "norm":
            layers.append(norm_cls(channels))
            if channels % 2 == 0 and pick([True, False]):
                layers.append(nn.GroupNorm(2, channels))
            elif pick([True, False]):
                layers.append({1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](
                    channels, affine=True))
        elif kind == "pool":
            pool = pick([nn.MaxPool1d, nn.AvgPool1d] if dims == 1 else [nn.MaxPool2d, nn.AvgPool2d] if dims == 2
                        else [nn.MaxPool3d, nn.AvgPool3d])
            layers.append(pool(2))
            size //= 2
        elif kind == "pad":
            layers.append({1: nn.ConstantPad1d((1, 0), 0.0), 2: nn.ZeroPad2d((0, 1, 1, 0)),
                           3: nn.ConstantPad3d((0, 1, 1, 0, 0, 1), 0.0)}[dims])
            size += 1
        elif kind == "upsample":
            layers.append(nn.Upsample(scale_factor=2, mode=pick(
                ["nearest", {1: "linear", 2: "bilinear", 3: "trilinear"}[dims]])))
            size *= 2
        elif kind == "skip":
            layers.append(_Skip(nn.Sequential(conv_cls(channels, channels, 3, padding=1), nn.ReLU())))
        else:
            layers.append(_Concat(conv_cls(channels, 2, 3, padding=1)))
            channels += 2
    if pick(["global", "global", "channels"]) == "global":
        head = [{1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims](1), nn.Flatten(),
                nn.Linear(channels, 3)]
    elif dims == 1:  # a sum over the channels
        head = [_Reduce((1,)), nn.Linear(size, 3)]
    else:  # a sum over the channels and the first spatial dim: dims that are not trailing
        head = [_Reduce((1, 2)), nn.Linear(size ** (dims - 1), 3)]
    model = nn.Sequential(*layers, *head)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            with torch.no_grad():
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval(), (2, *[9 if dims < 3 else 5] * dims)
