"""Exactness on a corpus of generated graphs (issue 12), against the independent oracles of ``exact_oracle.py``.

A seeded generator writes 200+ small random programs (DAGs over a few live (batch, width) tensors: linear layers,
activations, residual adds, products of branches, gates, self-products through copies and views, reshapes,
round-tripping transposes, slices, ``cat``, ``split`` into gates, LayerNorm, softmax, a layer used twice,
unrolled recurrent cells and ``nn.GRU``/``nn.LSTM``/``nn.RNN``) and crosses each with a random diagonal posterior
(all parameters or a subset, variances 1e-3 to 1e-2 of each parameter's mean square). For each program:

- the compiled mean (``covariance="full", predictive="glm"``) equals the plain forward pass;
- the compiled covariance equals the exact linearised covariance ``J diag(S) Jᵀ`` (autograd, float64) to rtol 1e-4,
  atol 1e-5 x max|cov|: the GLM exactness claim of the README;
- the covariance is symmetric and PSD to rounding;
- ONNX Runtime equals the torch moment graph at another batch size (a subset);
- ``covariance="diag", predictive="suq"`` is within 15% (median) of Monte Carlo at small variance (a few programs
  built from ops whose diag rule is exact or nearly so at small variance).

A few programs are also compiled with posteriors from laplace-torch (diag, kron: laplace-torch's own GLM predictive
is a second oracle) and IVON.

The exactness checks run the moment rules eagerly (``mp.eager``: tracing the moment graph is most of a compile's
time); the ONNX check compiles and exports. Programs are run in groups of ``GROUP`` (one module whose outputs are
concatenated along the last dim, each program with its own parameters, so the covariance is block diagonal and the
oracle still applies); every test is still one program, named by its op list (the failure message prints the whole
program), and checks its own rows of the covariance (cross blocks included). A group that fails to compile is
halved down to the failing program. The fast loop (``-m "not slow"``) runs the first ``FAST`` programs; programs
that are inexact with today's rules are listed in ``KNOWN_INEXACT_COV`` (xfail, not strict).
"""

from __future__ import annotations

import functools
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

import momentprop as mp
from exact_oracle import (
    compare_close, jacobian_covariance, median_relative_error, monte_carlo_moments, psd_problem, relative_posterior,
)

# torch.export warns that nn.RNN's flat weight list is assigned while tracing (harmless here)
pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes:UserWarning")

N_PROGRAMS = 200
GROUP = 10
BATCH = 4
SEED = 12

ACTIVATIONS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "softplus": nn.functional.softplus,
}


# ---------------------------------------------------------------------------------------------------------------
# programs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Instr:
    """``values.append(kind(values[args...]))``; ``mods``: names of this instruction's submodules; ``opt``: extra
    static options (an activation name, a split point, a number of steps, ...)."""

    kind: str
    args: tuple[int, ...]
    width: int
    mods: tuple[str, ...] = ()
    opt: dict = field(default_factory=dict)

    def text(self, i: int) -> str:
        args = ",".join(f"v{a}" for a in self.args)
        opt = "".join(f",{k}={v}" for k, v in self.opt.items())
        return f"v{i}={self.kind}({args}{opt})[{self.width}]"


@dataclass
class Program:
    index: int
    d_in: int
    instrs: list[Instr]
    specs: dict[str, tuple]  # module name -> (class name, constructor args)
    posterior_names: tuple[str, ...] | None  # None: every parameter
    rel: tuple[float, float]

    @property
    def id(self) -> str:
        return f"p{self.index:03d}-" + ".".join(i.kind for i in self.instrs[1:])

    def text(self) -> str:
        which = "all parameters" if self.posterior_names is None else "only " + ", ".join(self.posterior_names)
        ops = "; ".join(ins.text(i + 1) for i, ins in enumerate(self.instrs))
        return f"{self.id}: x[{self.d_in}]; {ops}; random: {which}"

    @property
    def out_width(self) -> int:
        return self.instrs[-1].width

    @property
    def kinds(self) -> set[str]:
        return {i.kind for i in self.instrs}


def _make_module(kind: str, args: tuple) -> nn.Module:
    if kind == "Linear":
        return nn.Linear(*args)
    if kind == "LayerNorm":
        ln = nn.LayerNorm(*args)
        with torch.no_grad():  # not the identity affine of a fresh LayerNorm
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
        return ln
    if kind == "RNNCell":
        return nn.RNNCell(args[0], args[1], nonlinearity=args[2])
    if kind == "RNN":
        return nn.RNN(args[0], args[1], nonlinearity=args[2], batch_first=True)
    return getattr(nn, kind)(*args, **({"batch_first": True} if kind in ("GRU", "LSTM") else {}))


class Generated(nn.Module):
    """The module of one program: ``forward(x)`` interprets the static instruction list."""

    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        with torch.random.fork_rng():
            torch.manual_seed(1000 + program.index)
            self.layers = nn.ModuleDict({name: _make_module(*spec) for name, spec in program.specs.items()})

    def forward(self, x):
        v = [x]
        for ins in self.program.instrs:
            v.append(_run(self.layers, ins, v))
        return v[-1]


def _seq_inputs(h, steps):
    """Per-step inputs of an unrolled recurrence: h, tanh(h), h, ..."""
    return [h if s % 2 == 0 else torch.tanh(h) for s in range(steps)]


def _run(L, ins: Instr, v):
    k, a, o = ins.kind, [v[i] for i in ins.args], ins.opt
    m = [L[name] for name in ins.mods]
    if k == "linear":
        return m[0](a[0])
    if k == "head":
        out = m[0](a[0])
        for layer, h in zip(m[1:], a[1:]):
            out = out + layer(h)
        return out
    if k in ACTIVATIONS:
        return ACTIVATIONS[k](a[0])
    if k == "add":
        return a[0] + a[1]
    if k == "mul":
        return a[0] * a[1]
    if k == "gate":
        return a[0] * torch.sigmoid(m[0](a[1]))
    if k == "self_clone":
        return a[0] * a[0].clone()
    if k == "self_view":
        return a[0] * a[0].view(a[0].shape)
    if k == "self_tt":
        return a[0].t().t() * a[0]
    if k == "self_einsum":
        return torch.einsum("bi,bi->bi", a[0], a[0])
    if k == "self_unsqueeze":
        h = a[0].unsqueeze(1)
        return (h * h).squeeze(1)
    if k == "reshape_rows":  # (B, w) -> (B, 1, w) -> (B, w)
        return a[0].reshape(a[0].shape[0], 1, -1).reshape(a[0].shape[0], -1)
    if k == "view_split":  # (B, w) -> (B, 2, w/2) -> (B, w): a new last dim built from the old one, and back
        h = a[0].view(a[0].shape[0], 2, -1)
        return torch.tanh(h).view(a[0].shape[0], -1)
    if k == "flatten":
        return a[0].unsqueeze(1).flatten(1)
    if k == "t_t":
        return torch.tanh(a[0].t()).t()
    if k == "transpose_rt":  # (B, w) -> (B, w, 1) -> (B, 1, w) -> (B, w)
        return a[0].unsqueeze(-1).transpose(1, 2).squeeze(1)
    if k == "permute_rt":  # (B, 1, w) -> (w, 1, B) -> (B, 1, w)
        return a[0].unsqueeze(1).permute(2, 1, 0).permute(2, 1, 0).squeeze(1)
    if k == "slice_cat":
        s = o["at"]
        return torch.cat([torch.tanh(a[0][:, s:]), a[0][:, :s]], dim=-1)
    if k == "cat":
        return torch.cat([a[0], a[1]], dim=-1)
    if k == "narrow":
        return a[0][..., o["lo"]:o["hi"]]
    if k == "split_gates":
        z = m[0](a[0])
        if o["gates"] == 2:
            g, c = torch.split(z, ins.width, dim=-1)
            return torch.sigmoid(g) * torch.tanh(c)
        i, f, c = torch.split(z, ins.width, dim=-1)
        return torch.sigmoid(i) * torch.tanh(c) + torch.sigmoid(f) * m[1](a[0])
    if k == "layernorm":
        return m[0](a[0])
    if k == "reuse":  # one weight used twice, on correlated inputs (a tied layer)
        return m[0](torch.tanh(m[0](a[0])))
    if k == "softmax":
        return torch.softmax(a[0], dim=-1)
    if k in ("grucell", "rnncell"):
        h = None
        for xs in _seq_inputs(a[0], o["steps"]):
            h = m[0](xs, h)
        return h
    if k == "lstmcell":
        hc = None
        for xs in _seq_inputs(a[0], o["steps"]):
            hc = m[0](xs, hc)
        return hc[0]
    if k in ("gru", "lstm", "rnn"):
        seq = torch.stack(_seq_inputs(a[0], o["steps"]), dim=1)
        out = m[0](seq)[0]
        return out[:, -1]
    raise AssertionError(k)


# the generator's op menu: kind -> weight (the recurrent ones are slower to compile, so rarer)
MENU = {
    "linear": 6, **{a: 1.5 for a in ACTIVATIONS}, "add": 3, "mul": 3, "gate": 2,
    "self_clone": 1, "self_view": 1, "self_tt": 1, "self_einsum": 1, "self_unsqueeze": 1,
    "reshape_rows": 1, "view_split": 0.7, "flatten": 0.7, "t_t": 0.7, "transpose_rt": 0.7, "permute_rt": 0.5,
    "slice_cat": 1, "cat": 1, "narrow": 1, "split_gates": 1.5, "layernorm": 1.5, "softmax": 1.2, "reuse": 1,
    "grucell": 0.2, "lstmcell": 0.2, "rnncell": 0.2, "gru": 0.2, "lstm": 0.2, "rnn": 0.2,
}


RECURRENT = ("grucell", "lstmcell", "rnncell", "gru", "lstm", "rnn")


def generate(index: int, rng: random.Random, menu: dict[str, float] = MENU, n_ops: tuple[int, int] = (2, 5)) -> Program:
    d_in = rng.randint(3, 8)
    specs: dict[str, tuple] = {}
    instrs: list[Instr] = []
    widths = [d_in]

    def new_mod(kind, *args):
        name = f"m{len(specs)}"
        specs[name] = (kind, args)
        return name

    used: set[int] = set()

    def pick(recent: int = 3) -> int:
        """A value, never the raw input: mostly one nothing uses yet (so little is dead code), else a recent one."""
        unused = [j for j in range(1, len(widths)) if j not in used]
        if unused and rng.random() < 0.7:
            return rng.choice(unused[-recent:])
        return rng.randint(max(1, len(widths) - recent), len(widths) - 1)

    def emit(kind, args, width, mods=(), **opt):
        instrs.append(Instr(kind, tuple(args), width, tuple(mods), opt))
        used.update(args)
        widths.append(width)

    w = rng.randint(3, 8)
    emit("linear", [0], w, [new_mod("Linear", d_in, w)])
    kinds, weights = list(menu), list(menu.values())
    target = rng.randint(*n_ops)
    attempts = 0
    while len(instrs) < target + 1:
        attempts += 1
        kind = rng.choices(kinds, weights)[0] if attempts < 100 else rng.choice(list(ACTIVATIONS))  # never stuck
        i = pick()
        wi = widths[i]
        if kind == "linear":
            w = rng.randint(3, 8)
            emit(kind, [i], w, [new_mod("Linear", wi, w)])
        elif kind in ACTIVATIONS or kind in ("self_clone", "self_view", "self_tt", "self_einsum", "self_unsqueeze",
                                            "reshape_rows", "flatten", "t_t", "transpose_rt", "permute_rt", "softmax"):
            emit(kind, [i], wi)
        elif kind in ("add", "mul"):
            same = [j for j in range(1, len(widths)) if widths[j] == wi and j != i]
            if not same:
                continue
            emit(kind, [i, rng.choice(same)], wi)
        elif kind == "gate":
            j = pick(5)
            emit(kind, [i, j], wi, [new_mod("Linear", widths[j], wi)])
        elif kind == "view_split":
            if wi % 2:
                continue
            emit(kind, [i], wi)
        elif kind == "slice_cat":
            if wi < 4:
                continue
            emit(kind, [i], wi, at=rng.randint(1, wi - 1))
        elif kind == "cat":
            j = pick(5)
            if wi + widths[j] > 8:
                continue
            emit(kind, [i, j], wi + widths[j])
        elif kind == "narrow":
            if wi < 4:
                continue
            lo = rng.randint(0, wi - 3)
            hi = rng.randint(lo + 3, wi)
            emit(kind, [i], hi - lo, lo=lo, hi=hi)
        elif kind == "split_gates":
            w = rng.randint(3, 6)
            gates = rng.choice([2, 3])
            mods = [new_mod("Linear", wi, gates * w)] + ([new_mod("Linear", wi, w)] if gates == 3 else [])
            emit(kind, [i], w, mods, gates=gates)
        elif kind == "layernorm":
            emit(kind, [i], wi, [new_mod("LayerNorm", wi)])
        elif kind == "reuse":
            emit(kind, [i], wi, [new_mod("Linear", wi, wi)])
        elif kind in RECURRENT:
            if any(ins.kind in RECURRENT for ins in instrs):  # at most one per program: they are large graphs
                continue
            hid = rng.randint(3, 6)
            steps = 2 if kind.endswith("cell") else 3  # the fewest the issue asks for: each step is a large graph
            cls = {"grucell": "GRUCell", "lstmcell": "LSTMCell", "rnncell": "RNNCell", "gru": "GRU", "lstm": "LSTM",
                   "rnn": "RNN"}[kind]
            args = (wi, hid) + ((rng.choice(["tanh", "relu"]),) if cls.startswith("RNN") else ())
            emit(kind, [i], hid, [new_mod(cls, *args)], steps=steps)
        else:
            raise AssertionError(kind)
    # the head: the sum of one Linear per value that nothing uses (the last one included), so no op is dead code;
    # a program whose last value is its only dead end keeps that value as its output 30% of the time
    ends = [j for j in range(1, len(widths)) if j not in used]
    if len(ends) > 1 or rng.random() < 0.7:
        c = rng.randint(3, 6)
        emit("head", ends, c, [new_mod("Linear", widths[j], c) for j in ends])
    names = None
    if rng.random() < 0.5:  # a random subset of the parameters (the module's names, fixed by the specs)
        all_names = [n for n, _ in Generated(Program(index, d_in, instrs, specs, None, (0, 0))).named_parameters()]
        names = tuple(n for n in all_names if rng.random() < 0.5) or (rng.choice(all_names),)
    return Program(index, d_in, instrs, specs, names, (1e-3, 1e-2))


def corpus(n: int = N_PROGRAMS, seed: int = SEED) -> list[Program]:
    rng = random.Random(seed)
    return [generate(i, rng) for i in range(n)]


PROGRAMS = corpus()


class Group(nn.Module):
    """Several programs on one input, outputs concatenated along the last dim (block-diagonal covariance)."""

    def __init__(self, programs: list[Program]):
        super().__init__()
        self.d_in = max(p.d_in for p in programs)
        self.graphs = nn.ModuleList([Generated(p) for p in programs])

    def forward(self, x):
        return torch.cat([g(x[:, : g.program.d_in]) for g in self.graphs], dim=-1)


def posterior_of(group: Group, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    post = {}
    for j, g in enumerate(group.graphs):
        p = g.program
        for name, var in relative_posterior(g, p.rel, gen, p.posterior_names).items():
            post[f"graphs.{j}.{name}"] = var
    return post


def inputs(d_in: int, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, d_in, generator=torch.Generator().manual_seed(seed))


@dataclass
class Result:
    group: Group
    posterior: dict
    x: torch.Tensor
    compiled: object  # CompiledModel, or the exception compiling raised
    mean: torch.Tensor | None
    cov: torch.Tensor | None
    plain: torch.Tensor
    oracle_out: torch.Tensor
    oracle_cov: torch.Tensor
    columns: list[slice]


def _result(programs: list[Program], seed: int, traced: bool = False) -> Result:
    """The group's moments: from ``mp.eager`` (the same rules, run without tracing a graph, which is most of a
    compile's time), or with ``traced`` from ``mp.compile``."""
    group = Group(programs).eval()
    post = posterior_of(group, seed)
    x = inputs(group.d_in, BATCH, seed)
    with torch.no_grad():
        plain = group(x)
    oracle_out, oracle_cov = jacobian_covariance(group, post, x)
    cols, start = [], 0
    for p in programs:
        cols.append(slice(start, start + p.out_width))
        start += p.out_width
    try:
        cm = (mp.compile if traced else mp.eager)(group, post, example_inputs=(x,), covariance="full", predictive="glm")
        with torch.no_grad():
            mean, cov = cm(x)
    except Exception as exc:  # recorded; the tests of these programs fail with it
        cm, mean, cov = exc, None, None
    return Result(group, post, x, cm, mean, cov, plain, oracle_out, oracle_cov, cols)


@functools.lru_cache(maxsize=None)
def compiled_block(lo: int, hi: int) -> Result:
    """``PROGRAMS[lo:hi]`` compiled as one module (inputs and posterior seeded by ``lo``)."""
    return _result(PROGRAMS[lo:hi], seed=100 + lo)


def result_of(program: Program) -> tuple[Result, slice]:
    """The compiled block holding ``program`` and its columns: its group of ``GROUP``, or where that did not
    compile, the half holding it, and so on down to the program alone (which then holds the exception)."""
    i = program.index
    lo = i // GROUP * GROUP
    hi = min(lo + GROUP, len(PROGRAMS))
    while True:
        res = compiled_block(lo, hi)
        if not isinstance(res.compiled, Exception) or hi - lo == 1:
            return res, res.columns[i - lo]
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if i < mid else (mid, hi)


def _compiled(res: Result, program: Program):
    if isinstance(res.compiled, Exception):
        pytest.fail(f"{program.text()}\ncompiling failed: {type(res.compiled).__name__}: {res.compiled}")


# Programs whose covariance check fails with today's rules: program -> (largest absolute error / max|oracle cov|,
# worst |error| / (atol + rtol |expected|)); such a program is xfail(strict=False) and its checks stay.
# ``python tests/test_corpus.py`` measures again.  None since 2026-12-03: the last ten were a matrix map moved
# through its last dimension (a transpose round trip through a size-1 dim, the stack of a recurrence's steps
# viewed as (batch, steps, features)), now moved exactly.
KNOWN_INEXACT_COV: dict[str, tuple[float, float]] = {}
KNOWN_INEXACT: dict[str, dict[str, str]] = {
    "cov": {k: f"max error about {e:.1%} of max|cov| (tolerance ratio {r:.2g})"
            for k, (e, r) in KNOWN_INEXACT_COV.items()},
}


# the fast loop (pytest -m "not slow") checks the first FAST programs; the whole corpus runs in CI
FAST = 2 * GROUP


def _params(check: str):
    out = []
    for p in PROGRAMS:
        marks = []
        reason = KNOWN_INEXACT.get(check, {}).get(p.id.split("-")[0])
        if reason:
            marks.append(pytest.mark.xfail(reason=reason, strict=False))
        if p.index >= FAST:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(p, id=p.id, marks=marks))
    return out


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------


def test_corpus_is_large_and_covers_the_menu():
    assert len(PROGRAMS) >= 200
    seen = set().union(*(p.kinds for p in PROGRAMS))
    menu = {kind for kind, weight in MENU.items() if weight > 0}
    assert menu <= seen, f"never generated: {sorted(menu - seen)}"
    assert len({p.id for p in PROGRAMS}) == len(PROGRAMS)


@pytest.mark.parametrize("program", _params("mean"))
def test_mean_is_the_plain_forward_pass(program: Program):
    res, cols = result_of(program)
    _compiled(res, program)
    problem = compare_close(res.mean[..., cols], res.plain[..., cols], rtol=1e-5, atol_scale=1e-5)
    assert problem is None, f"{program.text()}\nmean: {problem}"


@pytest.mark.parametrize("program", _params("cov"))
def test_glm_full_covariance_is_the_exact_linearisation(program: Program):
    res, cols = result_of(program)
    _compiled(res, program)
    assert res.cov.shape == (*res.mean.shape, res.mean.shape[-1])
    # this program's rows of the covariance, cross-covariances with the other programs of its group included
    problem = compare_close(res.cov[..., cols, :], res.oracle_cov[..., cols, :], rtol=1e-4, atol_scale=1e-5)
    assert problem is None, f"{program.text()}\ncovariance vs J diag(S) Jᵀ: {problem}"


@pytest.mark.parametrize("program", _params("psd"))
def test_covariance_is_symmetric_psd(program: Program):
    res, cols = result_of(program)
    _compiled(res, program)
    problem = psd_problem(res.cov[..., cols, cols])
    assert problem is None, f"{program.text()}\n{problem}"


# 30 programs through ONNX Runtime; export costs about 40 ms per moment-graph op here, so groups with a few thousand
# ops (group 0 has 7,000: an LSTM cell on random inputs) would take minutes each
ONNX_GROUPS = [1, 7, 14]


@pytest.mark.parametrize("g", [
    pytest.param(g, id=f"group{g}:" + ",".join(p.id.split("-")[0] for p in PROGRAMS[g * GROUP : (g + 1) * GROUP]),
                 marks=[pytest.mark.slow])
    for g in ONNX_GROUPS
])
def test_onnx_runtime_equals_torch_at_another_batch(g: int):
    res = _result(PROGRAMS[g * GROUP : (g + 1) * GROUP], seed=100 + g * GROUP, traced=True)
    if isinstance(res.compiled, Exception):
        pytest.fail(f"group {g} did not compile: {res.compiled}")
    x2 = inputs(res.group.d_in, 7, seed=7 + g)
    with torch.no_grad():
        mean, cov = res.compiled(x2)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "corpus.onnx"
        res.compiled.to_onnx(path)
        out = mp.OnnxRunner(path, threads=1)(x2.numpy())
    got_cov = torch.from_numpy(out["covariance"])
    names = [p.text() for p in PROGRAMS[g * GROUP : (g + 1) * GROUP]]
    for cols, text in zip(res.columns, names):
        problem = compare_close(torch.from_numpy(out["mean"])[..., cols], mean[..., cols], 1e-4, 1e-5)
        assert problem is None, f"{text}\nONNX mean: {problem}"
        problem = compare_close(got_cov[..., cols, :], cov[..., cols, :], 1e-4, 1e-5)
        assert problem is None, f"{text}\nONNX covariance: {problem}"


# Diag mode against Monte Carlo. Diag mode keeps the paper's independence assumptions (a residual or a product of
# two correlated branches is treated as independent), so these programs come from a menu of ops whose diag rule is
# exact for a single random layer or nearly so at small variance: one random layer, then deterministic
# elementwise ops, gates on deterministic values, self-products, reshapes, slices, splits.
MC_MENU = {a: 1 for a in ACTIVATIONS} | {
    "self_clone": 1, "self_tt": 1, "self_einsum": 1, "reshape_rows": 1, "slice_cat": 1, "narrow": 1, "flatten": 1,
}


def mc_programs(n: int = 4, seed: int = 77) -> list[Program]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = generate(1000 + i, rng, MC_MENU, (2, 4))
        p.posterior_names = None  # every parameter: the first layer's outputs are independent, the head's inputs too
        out.append(p)
    return out


@pytest.mark.parametrize("program", mc_programs(), ids=lambda p: p.id)
def test_diag_suq_matches_monte_carlo_at_small_variance(program: Program):
    model = Generated(program).eval()
    post = relative_posterior(model, 1e-4, torch.Generator().manual_seed(program.index))
    x = inputs(program.d_in, BATCH, seed=program.index)
    cm = mp.compile(model, post, example_inputs=(x,), covariance="diag", predictive="suq")
    with torch.no_grad():
        mean, var = cm(x)
    mc_mean, mc_var, _ = monte_carlo_moments(model, post, x, n_samples=4000, seed=program.index)
    err = median_relative_error(var, mc_var)
    assert err < 0.15, f"{program.text()}\ndiag suq variance vs Monte Carlo: median relative error {err:.3f}"
    assert var.min() >= 0


def measure() -> dict[str, dict[str, str]]:
    """Run every check and return the failures as ``KNOWN_INEXACT`` (``python tests/test_corpus.py`` prints it)."""
    out: dict[str, dict[str, str]] = {"mean": {}, "cov": {}, "psd": {}}
    for p in PROGRAMS:
        res, cols = result_of(p)
        key = p.id.split("-")[0]
        if isinstance(res.compiled, Exception):
            for check in out:
                out[check][key] = f"compiling fails: {type(res.compiled).__name__}: {str(res.compiled)[:120]}"
            continue
        problems = {
            "mean": compare_close(res.mean[..., cols], res.plain[..., cols], rtol=1e-5, atol_scale=1e-5),
            "cov": compare_close(res.cov[..., cols, :], res.oracle_cov[..., cols, :], rtol=1e-4, atol_scale=1e-5),
            "psd": psd_problem(res.cov[..., cols, cols]),
        }
        for check, problem in problems.items():
            if problem:
                out[check][key] = problem
        if problems["cov"]:
            got, want = res.cov[..., cols, :].double(), res.oracle_cov[..., cols, :]
            scale = want.abs().max().item()
            ratio = ((got - want).abs() / (1e-5 * scale + 1e-4 * want.abs())).max().item()
            out["cov"][key] = (round((got - want).abs().max().item() / scale, 3), float(f"{ratio:.2g}"))
    return out


if __name__ == "__main__":
    import pprint

    pprint.pprint(measure(), width=120)


# ---------------------------------------------------------------------------------------------------------------
# posteriors from the libraries: laplace-torch (diag, kron) and IVON, on a few programs that are exact today
# ---------------------------------------------------------------------------------------------------------------

LIBRARY_CASES = [  # (program, posterior); kron needs every parameter in a Linear layer
    ("p005", "laplace-diag"), ("p005", "laplace-kron"), ("p017", "laplace-kron"), ("p009", "laplace-diag"),
    ("p009", "laplace-kron"), ("p014", "ivon"), ("p017", "ivon"),  # p009, p014: a layer used twice
]


def _program(key: str) -> Program:
    return PROGRAMS[int(key[1:])]


def _training_data(p: Program) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(p.index)
    return torch.randn(64, p.d_in, generator=g), torch.randint(0, p.out_width, (64,), generator=g)


def _split_flat(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat variance vector in ``model.parameters()`` order as ``{name: variance}``."""
    out, i = {}, 0
    for name, q in model.named_parameters():
        out[name] = flat[i : i + q.numel()].view_as(q).detach()
        i += q.numel()
    assert i == flat.numel()
    return out


@pytest.mark.parametrize("key, library", [
    pytest.param(k, lib, id=f"{_program(k).id}-{lib}", marks=[] if i < 2 else [pytest.mark.slow])
    for i, (k, lib) in enumerate(LIBRARY_CASES)
])
def test_library_posteriors_are_exact(key: str, library: str):
    """The compiled GLM covariance equals the exact linearisation under laplace-torch's and IVON's posteriors
    (laplace-torch's own GLM predictive as a second oracle, the only one for kron)."""
    from torch.utils.data import DataLoader, TensorDataset

    p = _program(key)
    model = Generated(p).eval()
    X, y = _training_data(p)
    x = inputs(p.d_in, BATCH, seed=p.index)
    expected_cov = None
    if library.startswith("laplace"):
        import laplace

        la = laplace.Laplace(model, "classification", subset_of_weights="all",
                             hessian_structure=library.split("-")[1], prior_precision=1.0)
        la.fit(DataLoader(TensorDataset(X, y), batch_size=32))
        posterior = la
        _, glm_cov = la._glm_predictive_distribution(x)
        expected_cov = glm_cov.detach().double()
        variances = _split_flat(model, la.posterior_variance) if library == "laplace-diag" else None
    else:
        import ivon

        torch.manual_seed(p.index)  # IVON samples its weights from the global generator
        optimizer = ivon.IVON(model.parameters(), lr=0.05, ess=2_000.0, hess_init=1.0, beta2=0.99)
        for _ in range(5):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(X), y).backward()
            optimizer.step()
        model.eval()
        group = optimizer.param_groups[0]
        variances = _split_flat(model, 1.0 / (group["ess"] * (group["hess"] + group["weight_decay"])))
        posterior = optimizer
    cm = mp.compile(model, posterior, example_inputs=(x,), covariance="full", predictive="glm")
    with torch.no_grad():
        mean, cov = cm(x)
        plain = model(x)
    problem = compare_close(mean, plain, rtol=1e-5, atol_scale=1e-5)
    assert problem is None, f"{p.text()}\n{library}: mean: {problem}"
    if variances is not None:
        _, oracle_cov = jacobian_covariance(model, variances, x)
        problem = compare_close(cov, oracle_cov, rtol=1e-4, atol_scale=1e-5)
        assert problem is None, f"{p.text()}\n{library}: covariance vs J diag(S) Jᵀ: {problem}"
    if expected_cov is not None:
        problem = compare_close(cov, expected_cov, rtol=1e-4, atol_scale=1e-5)
        assert problem is None, f"{p.text()}\n{library}: covariance vs laplace-torch's GLM predictive: {problem}"
