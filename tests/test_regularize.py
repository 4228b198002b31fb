"""Label smoothing and annealed gradient noise: parity with torch, the noise schedule, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from kiln import Callback, StopRequest, Trainer
from kiln.engine.loss import IGNORE_INDEX, forward_loss_sum
from kiln.engine.regularize import GradientNoise, LabelSmoothing, build_regularizers


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
def test_label_smoothing_matches_torch_over_unmasked_tokens(eps: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 9, 50) * 3  # (B, T, V)
    labels = torch.randint(0, 50, (6, 9))
    labels[:, :3] = IGNORE_INDEX  # a masked prompt
    labels[4:, 6:] = IGNORE_INDEX  # padding
    mask = labels != IGNORE_INDEX
    ours = LabelSmoothing(eps)(logits.flatten(0, 1), labels.flatten())
    # The reference sees only the unmasked tokens: nothing else may leak into either term.
    ref = F.cross_entropy(logits[mask], labels[mask], label_smoothing=eps, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    mean = ours / mask.sum()
    ref_mean = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), label_smoothing=eps, ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)


def test_label_smoothing_gradient_matches_torch() -> None:
    torch.manual_seed(1)
    logits = torch.randn(20, 30, requires_grad=True)
    labels = torch.randint(0, 30, (20,))
    labels[::3] = IGNORE_INDEX
    LabelSmoothing(0.2)(logits, labels).backward()
    ours = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(
        logits, labels, label_smoothing=0.2, ignore_index=IGNORE_INDEX, reduction="sum"
    ).backward()
    torch.testing.assert_close(ours, logits.grad)
    assert ours[::3].abs().max() == 0  # masked tokens get no gradient


def test_forward_loss_sum_uses_the_loss_fn() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 64, (2, 10))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    plain, logits, shifted = forward_loss_sum(model, batch, "causal_lm")
    smooth, _, _ = forward_loss_sum(model, batch, "causal_lm", loss_fn=LabelSmoothing(0.1))
    mask = shifted != IGNORE_INDEX
    ref = F.cross_entropy(logits[mask], shifted[mask], label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(smooth, ref)
    assert smooth > plain


def test_gradient_noise_variance_follows_its_schedule() -> None:
    noise = GradientNoise(eta=0.3, gamma=0.55, seed=7)
    n = 200_000
    for step in (0, 1, 9, 99, 999):
        p = torch.nn.Parameter(torch.zeros(n))
        p.grad = torch.zeros(n)
        noise([p], step)
        want = 0.3 / (1 + step) ** 0.55
        assert noise.variance(step) == pytest.approx(want)
        # Sample variance of n normals: relative standard error sqrt(2 / n) ~ 0.32%.
        assert p.grad.var().item() == pytest.approx(want, rel=5 * math.sqrt(2 / n))
        assert abs(p.grad.mean().item()) < 5 * math.sqrt(want / n)


def test_gradient_noise_is_a_pure_function_of_seed_and_step() -> None:
    def draw(seed: int, step: int) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(4))]
        for p in params:
            p.grad = torch.ones_like(p)
        torch.manual_seed(123)  # the global RNG plays no part
        GradientNoise(eta=1.0, gamma=0.55, seed=seed)(params, step)
        return [p.grad.clone() for p in params]

    a = draw(0, 5)
    torch.randn(100)
    assert all(torch.equal(x, y) for x, y in zip(a, draw(0, 5), strict=True))
    assert not torch.equal(a[0], draw(0, 6)[0])
    assert not torch.equal(a[0], draw(1, 5)[0])
    assert not torch.equal(a[0], a[1][:3].expand(5, 3))  # parameters get different noise
    before = torch.get_rng_state()
    q = torch.nn.Parameter(torch.zeros(8))
    q.grad = torch.zeros(8)
    GradientNoise(eta=1.0)([q], 3)
    assert torch.equal(before, torch.get_rng_state())  # the training RNG stream is untouched
    # Parameters without a gradient are skipped, and eta 0 adds nothing.
    p = torch.nn.Parameter(torch.zeros(3))
    GradientNoise(eta=1.0)([p], 0)
    assert p.grad is None
    p.grad = torch.zeros(3)
    GradientNoise(eta=0.0)([p], 0)
    assert torch.equal(p.grad, torch.zeros(3))


def test_build_regularizers_from_config(tmp_path: Path, recipe_files) -> None:
    off = build_regularizers(tiny_config(tmp_path, *recipe_files))
    assert off.loss_fn is None
    assert off.grad_noise is None
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"label_smoothing": 0.1, "grad_noise": {"eta": 0.01, "gamma": 0.5}},
    )
    on = build_regularizers(cfg)
    assert on.loss_fn.state_dict() == {"epsilon": 0.1}
    assert on.grad_noise.state_dict() == {"eta": 0.01, "gamma": 0.5, "seed": cfg.seed}


class _Pause(Callback):
    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == 3:
            trainer.control.request_stop(StopRequest("requested", "test", resumable=True))


def test_label_smoothing_and_noise_train_and_resume_exactly(tmp_path: Path, recipe_files) -> None:
    def cfg(name: str, **train):
        return tiny_config(
            tmp_path / name,
            *recipe_files,
            train={"max_steps": 6, **train},
            eval={"every_steps": None},
        )

    regs = {"label_smoothing": 0.1, "grad_noise": {"eta": 0.05}}
    plain = Trainer(cfg("plain")).fit()
    ref_trainer = Trainer(cfg("ref", **regs))
    ref = ref_trainer.fit()
    assert ref.loss_history != plain.loss_history  # they change the training math
    # Validation loss stays the plain cross-entropy, whatever the training loss is.
    assert ref.metrics[-1]["val_loss"] > 0

    Trainer(cfg("cut", **regs), callbacks=[_Pause()]).fit()
    resumed = Trainer(cfg("cut", **regs), resume=True)
    result = resumed.fit()
    assert result.loss_history == ref.loss_history
    ref_state = ref_trainer.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
