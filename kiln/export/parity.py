"""Parity of an exported model with PyTorch: logits at several shapes, and greedy decoding.

The cases are fixed and seeded: batch 1 short, batch 3 long (up to 96 tokens or the
context), and batch 2 whose first row is padded (on the left for a decoder, as generation
pads; on the right for an encoder). Logits are compared on the real positions only (a padded
query's logits mean nothing), as max abs and max rel difference and argmax agreement. Greedy
decoding recomputes the whole sequence at each step, in the exported model and in PyTorch's
`generate` (as `kiln generate` does): the texts must be equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln.export.graph import Runner

__all__ = ["Case", "cases", "compare", "greedy_texts"]


@dataclass
class Case:
    name: str
    inputs: list[np.ndarray]
    """input_ids, attention_mask[, decoder_input_ids] (int64)."""

    @property
    def real(self) -> np.ndarray:
        """The positions whose logits count: (batch, sequence) of bool, of the query side."""
        if len(self.inputs) == 3:  # seq2seq: every decoder position is real
            return np.ones(self.inputs[2].shape, dtype=bool)
        return self.inputs[1].astype(bool)


def cases(seq2seq: bool, vocab: int, context: int | None) -> list[Case]:
    """The fixed parity inputs (seeded; token ids drawn from the whole vocabulary)."""
    gen = torch.Generator().manual_seed(1234)
    longest = min(96, context or 96)
    short = min(5, longest)

    def make(name: str, batch: int, length: int, pad: int = 0) -> Case:
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        mask = torch.ones_like(ids)
        if pad:  # row 0 padded: left for a decoder's prompt, right for an encoder's source
            if seq2seq:
                mask[0, length - pad :] = 0
            else:
                mask[0, :pad] = 0
        inputs = [ids.numpy(), mask.numpy()]
        if seq2seq:
            dec = torch.randint(0, vocab, (batch, max(1, length // 2)), generator=gen)
            inputs.append(dec.numpy())
        return Case(name, inputs)

    middle = max(2, longest // 2)
    return [
        make("batch 1, short", 1, short),
        make("batch 3, long", 3, longest),
        make("batch 2, first row padded", 2, middle, pad=max(1, middle // 3)),
    ]


def compare(reference: np.ndarray, got: np.ndarray, real: np.ndarray) -> dict[str, Any]:
    """max abs / max rel difference and argmax agreement over the real positions."""
    if reference.shape != got.shape:
        return {
            "shape": list(got.shape),
            "expected_shape": list(reference.shape),
            "max_abs": float("inf"),
            "max_rel": float("inf"),
            "argmax_equal": 0.0,
        }
    ref, out = reference[real].astype(np.float64), got[real].astype(np.float64)
    diff = np.abs(ref - out)
    rel = diff / np.maximum(np.abs(ref), 1e-6)
    agree = float(np.mean(ref.argmax(-1) == out.argmax(-1))) if ref.size else 1.0
    finite = bool(np.isfinite(out).all())
    return {
        "shape": list(got.shape),
        "max_abs": float(diff.max()) if finite and diff.size else (0.0 if finite else float("inf")),
        "max_rel": float(rel.max()) if finite and rel.size else (0.0 if finite else float("inf")),
        "argmax_equal": agree,
    }


def greedy_texts(
    run: Runner, tokenizer: Any, config: Any, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy decoding with full recompute through `run`, under `kiln generate`'s rules (the
    prompt's encoding and cut, EOS, special tokens skipped when decoded)."""
    from kiln.models.generation import encode_prompts, max_positions

    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    new, encoded = encode_prompts(
        tokenizer, prompts, max_new_tokens, max_positions(config), seq2seq
    )
    eos = tokenizer.eos_token_id
    texts = []
    for ids in encoded:
        source = np.asarray([ids], dtype=np.int64)
        out = [int(config.decoder_start_token_id)] if seq2seq else []
        for _ in range(new):
            if seq2seq:
                dec = np.asarray([out], dtype=np.int64)
                logits = run(source, np.ones_like(source), dec)
            else:
                seq = np.asarray([ids + out], dtype=np.int64)
                logits = run(seq, np.ones_like(seq))
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
        texts.append(tokenizer.decode(out, skip_special_tokens=True))
    return texts
