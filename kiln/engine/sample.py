"""Generate a sample from the model (the end-of-run sample, `kiln generate` later)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["generate_sample"]


@torch.no_grad()
def generate_sample(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    task: str,
    max_new_tokens: int = 200,
    seed: int = 0,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> str:
    """Sample a continuation (causal_lm: prompt + continuation; seq2seq: the target).

    Uses its own seeded RNG scope, so sampling never changes the training RNG stream.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=task == "seq2seq")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        model.train(was_training)
    tokens = out[0] if task == "seq2seq" else out[0, enc["input_ids"].shape[1] :]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return text if task == "seq2seq" else prompt + text
