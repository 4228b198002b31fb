"""Text generation from a trained model: greedy, sampling (temperature, top-p, top-k) or beams.

`generate_text` works on any loaded model (causal or seq2seq, plain or PEFT); `kiln generate
RUN_DIR|CKPT PROMPT` loads one with `kiln.models.load.load_trained` and calls it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import KilnError

__all__ = ["GenerationOptions", "generate_text"]

logger = logging.getLogger("kiln")


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode. Greedy by default; `do_sample` samples, `num_beams > 1` runs beam search."""

    max_new_tokens: int = 100
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    num_beams: int = 1
    seed: int = 0

    def check(self) -> None:
        """Raise a one-line KilnError naming the bad option."""
        if self.max_new_tokens < 1:
            raise KilnError(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise KilnError(f"--temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KilnError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise KilnError(f"--top-k: must be >= 1, got {self.top_k}")
        if self.num_beams < 1:
            raise KilnError(f"--num-beams: must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise KilnError("--num-beams: beam search is deterministic; drop --sample")

    def generate_kwargs(self) -> dict[str, Any]:
        """Arguments for `model.generate` (every decoding knob explicit, none from the model's
        generation_config)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
        else:  # unset the model's sampling defaults so transformers does not warn about them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.num_beams > 1:
            kwargs["early_stopping"] = True
        return kwargs


@torch.no_grad()
def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    task: str,
    options: GenerationOptions | None = None,
) -> str:
    """The model's output for `prompt`: the continuation (causal) or the target (seq2seq).

    The prompt is encoded as in training: causal prompts without special tokens (training
    text has none in front), seq2seq sources with them (T5 appends EOS). Sampling draws from
    a seeded RNG scope that leaves the global RNG untouched.
    """
    options = options or GenerationOptions()
    options.check()
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=task == "seq2seq")
    ids = enc["input_ids"].to(device)  # (1, T)
    if ids.shape[1] == 0:
        raise KilnError("PROMPT: empty after tokenization")
    kwargs = options.generate_kwargs()
    limit = getattr(model.config, "max_position_embeddings", None)
    if task != "seq2seq" and limit:  # learned positions end there (GPT-2's wpe)
        room = limit - ids.shape[1]
        if room < 1:
            raise KilnError(f"PROMPT: {ids.shape[1]} tokens; the model takes at most {limit}")
        if kwargs["max_new_tokens"] > room:
            logger.info("generating %d tokens: the model's context ends at %d", room, limit)
            kwargs["max_new_tokens"] = room
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(options.seed)
            out = model.generate(
                input_ids=ids,
                attention_mask=enc["attention_mask"].to(device),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
    finally:
        model.train(was_training)
    tokens = out[0] if task == "seq2seq" else out[0, ids.shape[1] :]
    return tokenizer.decode(tokens, skip_special_tokens=True)
