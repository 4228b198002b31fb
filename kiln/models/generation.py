"""Text generation: the one function behind `kiln generate`, generation eval and the run sample.

`generate_texts(model, tokenizer, prompts, options=GenerationOptions(...))` works on any loaded
model (decoder-only or encoder-decoder, plain or PEFT) and returns one text per prompt. Every
caller gets the same rules:

- **Special tokens.** A prompt is encoded as kiln's training encodes text
  (`kiln.data.tokenize`): the tokenizer adds no special tokens, so there is never a BOS in front
  (kiln trains none there), and a seq2seq source ends with EOS, as its training inputs do. An
  empty decoder-only prompt starts from EOS, the document boundary of packed training data. The
  output is the generated tokens only (the continuation, or the seq2seq target), decoded with
  special tokens skipped.
- **EOS and padding.** Decoding stops at the tokenizer's EOS (the model's generation config's
  when the tokenizer has none) and at `stop_ids` (a chat template's end of turn). Padding uses
  the tokenizer's pad token, else its EOS.
- **Context.** With the model's position limit L (`max_position_embeddings` / `n_positions`;
  none for relative-position models such as T5), `max_new_tokens` is capped at L - 1, a
  decoder-only prompt keeps its last L - max_new_tokens tokens (cut from the left: the
  continuation depends on the prompt's end), and a seq2seq source keeps its first L - 1 tokens
  and EOS, as training cuts it. Cuts are logged.
- **Batches** are padded by the tokenizer on the left for decoder-only models (every row then
  continues at the same position, and batched output equals one-at-a-time output) and on the
  right for encoders. The tokenizer's `padding_side` is passed per call, never changed.
- **Decoding** is greedy unless `do_sample` or `num_beams > 1`, through HF `model.generate`
  with every knob explicit (none comes from the model's generation config). Sampling draws
  from a fork of torch's RNG seeded with `seed`: the CPU and device RNG states are the same
  after the call, so the trainer can generate mid-run without changing training.
- **A time budget never cuts a sample** (`generate_samples`): batches not started when it runs
  out are skipped, and in the batch it ends, the samples that had not finished (no EOS, fewer
  than `max_new_tokens`) are left out; the finished ones are kept, the same as without a
  budget. So what a budget lets through does not depend on the machine's speed, only how much.
- The model runs in eval mode and gets its train/eval mode back afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import KilnError

__all__ = [
    "GenerationOptions",
    "encode_prompts",
    "generate_samples",
    "generate_texts",
    "max_positions",
    "run_sample",
]

logger = logging.getLogger("kiln")

_WARNED: set[str] = set()


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode. Greedy by default; `do_sample` samples, `num_beams > 1` runs beam search."""

    max_new_tokens: int = 100
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    """Sample from the k likeliest tokens; None: no top-k cut."""
    num_beams: int = 1
    seed: int = 0
    """Seed of the sampling RNG (a fork: the global RNG is untouched)."""
    stop_ids: tuple[int, ...] = ()
    """Token ids that end a row besides EOS (a chat template's end of turn, `chat_stop_ids`)."""

    def check(self, *, flags: bool = False) -> None:
        """Raise a one-line KilnError naming the first bad option (as its CLI flag with `flags`)."""

        def name(field: str) -> str:
            if not flags:
                return field
            return "--sample" if field == "do_sample" else "--" + field.replace("_", "-")

        if self.max_new_tokens < 1:
            raise KilnError(f"{name('max_new_tokens')}: must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise KilnError(f"{name('temperature')}: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KilnError(f"{name('top_p')}: must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise KilnError(f"{name('top_k')}: must be >= 1, got {self.top_k}")
        if self.num_beams < 1:
            raise KilnError(f"{name('num_beams')}: must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise KilnError(
                f"{name('num_beams')}: beam search is deterministic; drop {name('do_sample')}"
            )

    def generate_kwargs(self) -> dict[str, Any]:
        """Decoding arguments for `model.generate` (all explicit, none from generation_config)."""
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


def max_positions(config: Any) -> int | None:
    """The model's position limit (`max_position_embeddings` or `n_positions`), None if none."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    options: GenerationOptions | None = None,
    batch_size: int = 8,
    max_time_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    synced: Any = None,
) -> list[str]:
    """Generate from each prompt under the module's rules (special tokens, EOS, context).

    Args:
        model: a transformers model with `generate` (decoder-only or encoder-decoder, or PEFT).
        tokenizer: its tokenizer; left as it is (one without a pad token gets EOS as its pad
            token only while a batch is padded).
        prompts: decoder-only: text to continue; seq2seq: source texts.
        options: decoding options; greedy with 100 new tokens by default.
        batch_size: prompts generated together.
        max_time_s: time budget of the whole call; it never cuts a sample short (see
            `generate_samples`).
        should_stop: checked before each batch; True skips the remaining batches.
        synced: a `kiln.rank.RankContext` whose ranks all run this call on the same prompts (a
            model sharded over them: every forward is a collective). Each rank then runs as
            many forwards as the longest (HF's `synced_gpus`), and the main rank decides when
            the time budget or `should_stop` ends it.

    Returns:
        The generated text of each prompt in order (the continuation, or the seq2seq target):
        fewer, the complete ones up to the first the budget or `should_stop` left out.

    Raises:
        KilnError: a bad option, or a tokenizer with neither a pad nor an EOS token.
    """
    texts = generate_samples(
        model,
        tokenizer,
        prompts,
        options=options,
        batch_size=batch_size,
        max_time_s=max_time_s,
        should_stop=should_stop,
        synced=synced,
    )
    done = texts.index(None) if None in texts else len(texts)
    return texts[:done]  # type: ignore[return-value]


@torch.no_grad()
def generate_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    options: GenerationOptions | None = None,
    batch_size: int = 8,
    max_time_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    synced: Any = None,
) -> list[str | None]:
    """`generate_texts`, one entry per prompt: its text, or None for a sample left out.

    `max_time_s` is a budget of whole samples: once it runs out no batch starts; the batch
    running then stops decoding, and of its rows those that had finished (EOS, or
    `max_new_tokens` generated) are kept while the others are None, never a cut text. A kept
    text is the one an unbudgeted call gives (decoding is row by row the same up to the stop).
    `should_stop` skips the batches after it says so (None). Arguments as `generate_texts`.
    """
    options = options or GenerationOptions()
    options.check()
    if batch_size < 1:
        raise KilnError(f"batch_size: must be >= 1, got {batch_size}")
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise KilnError("generation: the tokenizer has neither a pad nor an eos token")
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    limit = max_positions(model.config)
    new_tokens, encoded = encode_prompts(tokenizer, prompts, options.max_new_tokens, limit, seq2seq)
    kwargs = {**options.generate_kwargs(), "max_new_tokens": new_tokens, "pad_token_id": pad}
    if options.stop_ids:  # a chat turn's end, and EOS
        kwargs["eos_token_id"] = [*([] if eos is None else [eos]), *options.stop_ids]
    elif eos is not None:  # else the model's generation config has the say
        kwargs["eos_token_id"] = eos
    sync = synced is not None and synced.distributed
    if sync:
        kwargs["synced_gpus"] = True
    device = next(model.parameters()).device
    texts: list[str | None] = [None] * len(encoded)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with _seeded_rng(options.seed, device):
            for first in range(0, len(encoded), batch_size):
                left = None if max_time_s is None else max_time_s - (time.perf_counter() - start)
                end = left is not None and left <= 0
                end = end or (should_stop is not None and should_stop())
                if sync:
                    end, left = synced.broadcast((end, left), "generation budget")
                if end:
                    break
                if left is not None:
                    kwargs["max_time"] = left
                with _pad_token(tokenizer, pad):
                    batch = tokenizer.pad(
                        {"input_ids": encoded[first : first + batch_size]},
                        padding=True,
                        padding_side="right" if seq2seq else "left",
                        return_tensors="pt",
                    )
                ids = batch["input_ids"].to(device)  # (B, T)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=batch["attention_mask"].to(device),
                    **kwargs,
                )
                # seq2seq: (B, 1 + new) from the decoder start; decoder-only: (B, T + new).
                out = out if seq2seq else out[:, ids.shape[1] :]
                decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
                complete = _finished(out[:, 1:] if seq2seq else out, new_tokens, kwargs, model)
                for i, (text, done) in enumerate(zip(decoded, complete, strict=True)):
                    texts[first + i] = text if done or left is None else None
    finally:
        model.train(was_training)
    return texts


def _finished(new: torch.Tensor, max_new: int, kwargs: dict[str, Any], model: Any) -> list[bool]:
    """Which rows of a batch's new tokens `new` (B, N) finished: an EOS among them, or all
    `max_new` generated (a stop by `max_time` ends every row short of that)."""
    if new.shape[1] >= max_new:
        return [True] * new.shape[0]
    eos = kwargs.get("eos_token_id")
    if eos is None:  # the model's generation config's (an id or a list of ids)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if not ids:
        return [False] * new.shape[0]
    return torch.isin(new, torch.tensor(ids, device=new.device)).any(dim=1).tolist()


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, limit: int | None, seq2seq: bool
) -> tuple[int, list[list[int]]]:
    """(new tokens, each prompt's ids): encoded, cut and ended as the module docstring says."""
    ids = [list(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    eos = tokenizer.eos_token_id
    new = max_new_tokens
    if limit is not None and new > limit - 1:
        _warn_once(f"generating {limit - 1} tokens, not {new}: the model has {limit} positions")
        new = limit - 1
    end = [] if eos is None else [eos]
    if seq2seq:  # keep the start and end with EOS, as training cuts sources
        keep = None if limit is None else limit - len(end)
        cut = sum(keep is not None and len(x) > keep for x in ids)
        ids = [x[:keep] + end for x in ids]
    else:  # keep the end: that is what the continuation follows
        keep = None if limit is None else limit - new
        cut = sum(keep is not None and len(x) > keep for x in ids)
        ids = [x if keep is None else x[-keep:] for x in ids]
        if not all(ids):
            if eos is None:
                raise KilnError("generation: an empty prompt, and no eos token to start from")
            ids = [x or [eos] for x in ids]
    if cut:
        side = "end" if seq2seq else "start"
        _warn_once(
            f"generation: {cut} of {len(ids)} prompts cut at the {side} to {keep} tokens "
            f"(the model has {limit} positions)"
        )
    return new, ids


def _warn_once(message: str) -> None:
    # Generation eval runs at every validation with the same prompts: say it once.
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


@contextmanager
def _pad_token(tokenizer: Any, pad: int) -> Iterator[None]:
    """The tokenizer pads with `pad` (its own pad token, else EOS) inside; restored after."""
    if tokenizer.pad_token_id is not None:
        yield
        return
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    try:
        yield
    finally:
        tokenizer.pad_token = None


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's RNG of the CPU and of `device` seeded with `seed` inside, restored after.

    Only those two are seeded (`torch.manual_seed` would also reseed every other GPU, outside
    the fork).
    """
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(
        devices=[device] if accelerator else [],
        device_type=device.type if accelerator else None,
    ):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif accelerator:
            torch.get_device_module(device.type).manual_seed(seed)
        yield


def run_sample(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    seed: int,
    synced: Any = None,
    *,
    chat: bool = False,
) -> str:
    """The end-of-run sample (summary.json): sampled at temperature 0.7, top-p 0.9, seeded;
    a decoder-only model's text includes the prompt. `chat`: the prompt is a user message,
    rendered with the chat template, and the text is the conversation with the reply.
    `synced`: as for `generate_texts`."""
    stops: tuple[int, ...] = ()
    if chat:
        from kiln.data.chat import chat_prompt, chat_stop_ids

        prompt, stops = chat_prompt(tokenizer, prompt), chat_stop_ids(tokenizer)
    options = GenerationOptions(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        seed=seed,
        stop_ids=stops,
    )
    [text] = generate_texts(model, tokenizer, [prompt], options=options, synced=synced)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    return text if seq2seq else prompt + text
