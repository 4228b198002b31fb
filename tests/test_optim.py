"""Tests for kiln.optim: schedules, HF parity, parameter grouping, and AdamW construction."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable

import pytest
import torch
import transformers
from torch.optim.lr_scheduler import LambdaLR
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kiln.optim import (
    SCHEDULERS,
    build_optimizer,
    lr_multiplier,
    make_schedule,
    param_group_names,
    param_groups,
    render_schedule,
    schedule_table,
    set_lr,
)

W, T = 10, 110  # warmup 10, 100 decay steps: step 60 is exactly half-way through decay.


def mult(step: int, scheduler: str, **kw: float) -> float:
    kw.setdefault("warmup_steps", W)
    kw.setdefault("total_steps", T)
    return lr_multiplier(step, scheduler=scheduler, **kw)


# --- closed forms -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_warmup_is_shared_and_reaches_one_on_last_warmup_step(scheduler: str) -> None:
    assert mult(0, scheduler) == pytest.approx(1 / W)
    assert mult(4, scheduler) == pytest.approx(5 / W)
    assert mult(W - 1, scheduler) == 1.0
    assert mult(W, scheduler) == 1.0  # first post-warmup step is the peak too


def test_constant() -> None:
    for step in (W, 60, T - 1, T, 10 * T):
        assert mult(step, "constant") == 1.0
    assert lr_multiplier(0, scheduler="constant", warmup_steps=0, total_steps=5) == 1.0


@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_linear(ratio: float) -> None:
    def closed(p: float) -> float:
        return ratio + (1 - ratio) * (1 - p)

    assert mult(60, "linear", min_lr_ratio=ratio) == pytest.approx(closed(0.5))
    assert mult(T - 1, "linear", min_lr_ratio=ratio) == pytest.approx(closed(0.99))
    assert mult(T, "linear", min_lr_ratio=ratio) == pytest.approx(ratio)
    assert mult(5 * T, "linear", min_lr_ratio=ratio) == pytest.approx(ratio)  # held after end


@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_cosine(ratio: float) -> None:
    def closed(p: float) -> float:
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * p))

    assert mult(35, "cosine", min_lr_ratio=ratio) == pytest.approx(closed(0.25))
    assert mult(60, "cosine", min_lr_ratio=ratio) == pytest.approx(ratio + (1 - ratio) * 0.5)
    assert mult(T - 1, "cosine", min_lr_ratio=ratio) == pytest.approx(closed(0.99))
    assert mult(T, "cosine", min_lr_ratio=ratio) == pytest.approx(ratio)
    assert mult(5 * T, "cosine", min_lr_ratio=ratio) == pytest.approx(ratio)


def test_cosine_restarts_restart_at_cycle_boundaries() -> None:
    kw = {"warmup_steps": 0, "total_steps": 100, "num_cycles": 2, "min_lr_ratio": 0.2}
    assert mult(0, "cosine_restarts", **kw) == 1.0
    assert mult(25, "cosine_restarts", **kw) == pytest.approx(0.2 + 0.8 * 0.5)
    assert mult(49, "cosine_restarts", **kw) < 0.21  # bottom of cycle 1 ...
    assert mult(50, "cosine_restarts", **kw) == 1.0  # ... hard restart to the peak
    assert mult(75, "cosine_restarts", **kw) == pytest.approx(0.6)
    assert mult(99, "cosine_restarts", **kw) < 0.21
    assert mult(100, "cosine_restarts", **kw) == 0.2  # no restart at the very end
    assert mult(1000, "cosine_restarts", **kw) == 0.2


def test_cosine_restarts_with_one_cycle_equals_cosine() -> None:
    for step in range(T + 5):
        assert mult(step, "cosine_restarts", min_lr_ratio=0.1) == pytest.approx(
            mult(step, "cosine", min_lr_ratio=0.1)
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheduler": "triangle"}, "unknown scheduler"),
        ({"step": -1}, "step"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": 20, "total_steps": 10}, "exceeds"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"num_cycles": 0}, "num_cycles"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"step": 0, "scheduler": "cosine", "warmup_steps": 1, "total_steps": 10} | kwargs
    step = args.pop("step")
    with pytest.raises(ValueError, match=match):
        lr_multiplier(step, **args)


def test_make_schedule_validates_eagerly_and_pickles() -> None:
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_schedule(scheduler="nope", warmup_steps=0, total_steps=10)
    fn = make_schedule(scheduler="cosine", warmup_steps=W, total_steps=T, min_lr_ratio=0.1)
    clone = pickle.loads(pickle.dumps(fn))
    for step in (0, W, 60, T):
        assert fn(step) == clone(step) == mult(step, "cosine", min_lr_ratio=0.1)


# --- parity with transformers (post-warmup only: HF warms up with step / warmup) ----------------

CASES = [(0, 100), (10, 100), (7, 53), (100, 1000), (1, 2)]


def hf_lambda(
    factory: Callable[..., LambdaLR], warmup: int, total: int, **kw: float
) -> Callable[[int], float]:
    """Return the step -> multiplier lambda of an HF scheduler factory."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return factory(opt, num_warmup_steps=warmup, num_training_steps=total, **kw).lr_lambdas[0]


def assert_parity(
    hf: Callable[[int], float], ours: Callable[[int], float], warmup: int, total: int
) -> None:
    """Compare every post-warmup step up to and including total_steps."""
    for step in range(warmup, total + 1):
        assert ours(step) == pytest.approx(hf(step), rel=1e-12, abs=1e-12), step


@pytest.mark.parametrize(("warmup", "total"), CASES)
def test_parity_linear(warmup: int, total: int) -> None:
    hf = hf_lambda(transformers.get_linear_schedule_with_warmup, warmup, total)
    ours = make_schedule(scheduler="linear", warmup_steps=warmup, total_steps=total)
    assert_parity(hf, ours, warmup, total)


@pytest.mark.parametrize(("warmup", "total"), CASES)
def test_parity_cosine(warmup: int, total: int) -> None:
    hf = hf_lambda(transformers.get_cosine_schedule_with_warmup, warmup, total)
    ours = make_schedule(scheduler="cosine", warmup_steps=warmup, total_steps=total)
    assert_parity(hf, ours, warmup, total)


@pytest.mark.parametrize(("warmup", "total"), CASES)
def test_parity_constant(warmup: int, total: int) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=warmup).lr_lambdas[0]
    ours = make_schedule(scheduler="constant", warmup_steps=warmup, total_steps=total)
    assert_parity(hf, ours, warmup, total)


@pytest.mark.parametrize(("warmup", "total"), CASES)
@pytest.mark.parametrize("cycles", [1, 2, 3, 7])
def test_parity_cosine_hard_restarts(warmup: int, total: int, cycles: int) -> None:
    factory = transformers.get_cosine_with_hard_restarts_schedule_with_warmup
    hf = hf_lambda(factory, warmup, total, num_cycles=cycles)
    ours = make_schedule(
        scheduler="cosine_restarts", warmup_steps=warmup, total_steps=total, num_cycles=cycles
    )
    assert_parity(hf, ours, warmup, total)


@pytest.mark.skipif(
    not hasattr(transformers, "get_cosine_with_min_lr_schedule_with_warmup"),
    reason="transformers lacks get_cosine_with_min_lr_schedule_with_warmup",
)
@pytest.mark.parametrize(("warmup", "total"), CASES)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_parity_cosine_min_lr(warmup: int, total: int, ratio: float) -> None:
    factory = transformers.get_cosine_with_min_lr_schedule_with_warmup
    hf = hf_lambda(factory, warmup, total, min_lr_rate=ratio)
    ours = make_schedule(
        scheduler="cosine", warmup_steps=warmup, total_steps=total, min_lr_ratio=ratio
    )
    assert_parity(hf, ours, warmup, total)


# --- rendering ----------------------------------------------------------------------------------


def columns(chart: str, height: int) -> list[int]:
    rows = [line.split("|", 1)[1] for line in chart.splitlines()[:height]]
    return [sum(row[c] == "#" for row in rows) for c in range(len(rows[0]))]


def test_render_schedule_shape_and_monotone_cosine() -> None:
    fn = make_schedule(scheduler="cosine", warmup_steps=100, total_steps=1000)
    chart = render_schedule(fn, 1000, width=50, height=8)
    lines = chart.splitlines()
    assert len(lines) == 8 + 2
    heights = columns(chart, 8)
    assert len(heights) == 50
    assert min(heights) >= 1
    assert max(heights) == 8
    peak = heights.index(8)
    assert peak <= 6  # warmup is the first ~10% of the width
    assert heights[:peak] == sorted(heights[:peak])
    assert heights[peak:] == sorted(heights[peak:], reverse=True)
    assert lines[0].split("|")[0].strip() == "1"
    assert all(len(line.split("|", 1)[1]) == 50 for line in lines[:8])
    # The bottom label is the smallest *sampled* value (step 999), not the exact 0 at step 1000.
    assert float(lines[7].split("|")[0]) == pytest.approx(fn(999), rel=1e-2)
    assert all(line.split("|")[0].strip() == "" for line in lines[1:7])
    assert lines[-1].split() == ["0", "1000"]
    assert lines[-1].endswith("1000")
    assert len(lines[-1]) == len(lines[0])


def test_render_schedule_labels_absolute_lr() -> None:
    fn = make_schedule(scheduler="linear", warmup_steps=0, total_steps=200, min_lr_ratio=0.1)
    lines = render_schedule(fn, 200, base_lr=3e-4).splitlines()
    assert len(lines) == 12
    assert lines[0].startswith("3.00e-04 |")
    assert lines[9].startswith("3.")
    assert "e-05 |" in lines[9]


def test_render_schedule_flat_and_invalid() -> None:
    fn = make_schedule(scheduler="constant", warmup_steps=0, total_steps=5)
    chart = render_schedule(fn, 5, width=10, height=3)
    assert columns(chart, 3) == [3] * 10
    with pytest.raises(ValueError, match="width >= 2"):
        render_schedule(fn, 5, width=1)
    with pytest.raises(ValueError, match="total_steps >= 1"):
        render_schedule(fn, 0)


def test_schedule_table() -> None:
    fn = make_schedule(scheduler="cosine", warmup_steps=100, total_steps=1000)
    table = schedule_table(fn, 1000, 1e-3)
    assert len(table) == 8
    assert table[0] == (0, pytest.approx(1e-5))
    assert table[-1][0] == 999
    steps = [s for s, _ in table]
    assert steps == sorted(steps)
    for s, lr in table:
        assert lr == pytest.approx(1e-3 * fn(s))
    assert [s for s, _ in schedule_table(fn, 3, 1.0)] == [0, 1, 2]


# --- parameter groups ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def check_groups(model: torch.nn.Module, wd: float = 0.1) -> dict[str, list[str]]:
    groups = param_groups(model, wd)
    assert [g["weight_decay"] for g in groups] == [wd, 0.0]
    assert all(set(g) == {"params", "weight_decay"} for g in groups)
    flat = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in flat}) == len(flat)
    assert sum(p.numel() for p in flat) == sum(p.numel() for p in model.parameters())
    names = param_group_names(model)
    assert [len(names[k]) for k in ("decay", "no_decay")] == [len(g["params"]) for g in groups]
    return names


def test_param_groups_gpt2(gpt2: GPT2LMHeadModel) -> None:
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    names = check_groups(gpt2)
    decay, no_decay = names["decay"], names["no_decay"]
    assert "transformer.wte.weight" in decay
    assert "lm_head.weight" not in decay + no_decay
    assert all(n.endswith(".weight") for n in decay)
    assert all(".ln_" not in n for n in decay)
    for i in range(2):
        for ln in ("ln_1", "ln_2"):
            assert f"transformer.h.{i}.{ln}.weight" in no_decay
        assert f"transformer.h.{i}.attn.c_attn.bias" in no_decay
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias"} <= set(no_decay)
    assert len(decay) == 2 + 2 * 4  # wte, wpe, then 4 Conv1D weights per block


def test_param_groups_llama(llama: LlamaForCausalLM) -> None:
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    names = check_groups(llama)
    assert names["decay"].count("model.embed_tokens.weight") == 1
    assert "lm_head.weight" not in names["decay"] + names["no_decay"]
    expected = {"model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight"
        for i in range(2)
        for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert set(names["no_decay"]) == expected
    assert all("norm" not in n for n in names["decay"])


class FancyNorm(torch.nn.Module):
    """A third-party-style norm with a 2-D weight, only detectable by class name."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 4))


def test_param_groups_custom_norm_frozen_and_shared() -> None:
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.ModuleDict(
        {
            "a": shared,
            "b": shared,  # shared module: its params must appear once
            "norm": FancyNorm(),
            "gn": torch.nn.GroupNorm(2, 4),
            "frozen": torch.nn.Linear(4, 4),
        }
    )
    model["frozen"].requires_grad_(False)
    names = param_group_names(model)
    assert names == {
        "decay": ["a.weight"],
        "no_decay": ["a.bias", "norm.weight", "gn.weight", "gn.bias"],
    }
    groups = param_groups(model, 0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == 16 + 4 + 8 + 4 + 4


# --- optimizer ----------------------------------------------------------------------------------


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int = 3) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 8))
    for _ in range(n):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [None, True, False])
def test_build_optimizer_steps(fused: bool | None) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=fused)
    assert isinstance(opt, torch.optim.AdamW)
    # CPU auto-selects fused: it measured faster than foreach (see kiln/optim.py).
    assert opt.defaults["fused"] is (fused is not False)
    assert opt.defaults["foreach"] is (True if fused is False else None)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    train_steps(model, opt)
    assert not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


def test_fused_and_foreach_agree() -> None:
    # Fixed synthetic grads isolate the update arithmetic: through a real model the tiny
    # rounding differences between kernels get amplified by later forward/backward passes.
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
        opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, fused=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_build_optimizer_fused_on_unsupported_device_raises() -> None:
    model = torch.nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match=r"fused=True.*'weight'.*meta"):
        build_optimizer(model, lr=1e-3, weight_decay=0.0, fused=True)
    auto = build_optimizer(model, lr=1e-3, weight_decay=0.0)  # auto falls back to foreach
    assert auto.defaults["fused"] is False
    assert auto.defaults["foreach"] is True


def test_build_optimizer_without_trainable_params_raises() -> None:
    model = torch.nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(model, lr=1e-3, weight_decay=0.0)


def test_set_lr() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]
    with pytest.raises(ValueError, match="lr must be >= 0"):
        set_lr(opt, -1.0)


def test_set_lr_updates_tensor_lr_in_place() -> None:
    p = torch.nn.Parameter(torch.zeros(2, 2))
    lr = torch.tensor(1e-3)
    opt = torch.optim.AdamW([p], lr=lr, fused=True)
    held = opt.param_groups[0]["lr"]
    set_lr(opt, 2e-3)
    assert opt.param_groups[0]["lr"] is held
    assert held.item() == pytest.approx(2e-3)
