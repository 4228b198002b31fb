"""Preference pairs (`task: preference`): a prompt, a chosen and a rejected completion, for
preference optimization (DPO, `kiln.engine.preference`).

A row is `{prompt, chosen, rejected}` as strings, or in chat form: `prompt` a list of messages
and `chosen` / `rejected` lists of (assistant) messages, rendered with the chat template.
Tokenized as TRL's DPOTrainer does, so the two train the same tokens: the prompt alone, and
prompt + completion whole (text completions end with the tokenizer's EOS, unless they already
do; chat completions end as the template ends a turn); the completion is what follows the
longest common prefix of the two (where the prompt's last token merged with the completion's
first, the merged token belongs to the completion).

The examples are a `TokenDataset` of 2N sequences, chosen and rejected interleaved (2i, 2i+1),
each with its labels aligned (-100 on the prompt), which the tokenization cache stores like any
other; `PreferenceDataset` presents them as N pairs, and `collate_preference` batches B pairs as
(2B, T): the B chosen sequences, then the B rejected ones.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kiln.data.chat import ChatFormat
from kiln.data.collate import IGNORE_INDEX
from kiln.data.dataset import TokenDataset
from kiln.data.sources import _Problems, json_type, where
from kiln.data.tasks import _RowError
from kiln.data.tokenize import report_dropped
from kiln.errors import ModelError

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

__all__ = ["PreferenceDataset", "PreferenceFormat", "tokenize_preference"]

log = logging.getLogger("kiln")

_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceFormat:
    """preference: the row's prompt, chosen and rejected, checked; rendered as (form, prompt,
    chosen, rejected) with form "text" or "chat" (the three then JSON message lists)."""

    parts: ClassVar[tuple[str, ...]] = ("form", "prompt", "chosen", "rejected")

    def render(self, row: Mapping[str, Any], index: int) -> tuple[str, str, str, str]:
        """The row's pair (see `TaskFormat.render`)."""
        at = where(row, index)
        for name in _FIELDS:
            if name not in row:
                raise _RowError(f"{at}: missing field '{name}'")
        values = [row[name] for name in _FIELDS]
        if all(isinstance(v, str) for v in values):
            for name, value in zip(_FIELDS[1:], values[1:], strict=True):
                if not value:
                    raise _RowError(f"{at}: field '{name}' is empty")
            return ("text", *values)  # type: ignore[return-value]
        if not all(isinstance(v, list) for v in values):
            kinds = ", ".join(f"{n}: {json_type(v)}" for n, v in zip(_FIELDS, values, strict=True))
            raise _RowError(
                f"{at}: prompt, chosen and rejected must all be strings or all be message "
                f"lists, got {kinds}"
            )
        messages = []
        for name, value in zip(_FIELDS, values, strict=True):
            checked = _messages(value, name, at, index)
            if name != "prompt" and checked[-1]["role"] != "assistant":
                raise _RowError(f"{at}: {name} must end with an assistant message")
            messages.append(json.dumps(checked, ensure_ascii=False))
        return ("chat", *messages)  # type: ignore[return-value]


def _messages(value: list[Any], name: str, at: str, index: int) -> list[dict[str, str]]:
    """`value` checked as a message list (as `ChatFormat` checks a conversation)."""
    if not value:
        raise _RowError(f"{at}: field '{name}' is an empty conversation")
    fmt = ChatFormat(name)
    try:
        # ChatFormat insists on an assistant turn (a prompt has none): checked with one added.
        probe = [*value, {"role": "assistant", "content": ""}]
        return json.loads(fmt.render({name: probe}, index)[0])[: len(value)]
    except _RowError as exc:
        raise _RowError(f"{at}: {str(exc).split(': ', 1)[1]}") from None


def _prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode(
    tokenizer: PreTrainedTokenizerBase, form: str, prompt: str, completion: str | None
) -> list[int]:
    """Token ids of the prompt (`completion` None) or prompt + completion, as TRL makes them."""
    if form == "text":
        text = prompt if completion is None else prompt + completion
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[return-value]
    messages = json.loads(prompt) + ([] if completion is None else json.loads(completion))
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=completion is None
    )
    return list(out["input_ids"])  # type: ignore[index]


def tokenize_preference(
    rendered: Sequence[tuple[str, ...]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: bool = True,
    *,
    locations: Sequence[str] | None = None,
    what: str = "data",
    quiet: bool = False,
) -> TokenDataset:
    """Tokenize preference pairs into 2N sequences (chosen, rejected interleaved) with labels
    on the completions (see the module docstring).

    Longer than `max_length` tokens: with `truncation`, each sequence keeps its first
    `max_length` tokens (TRL's `keep_start`); a pair whose prompt leaves no room for a
    completion token is dropped (logged). Without, each too-long pair is a DataError naming it.

    Raises:
        ModelError: chat pairs and the tokenizer has no chat template.
        DataError: pairs that cannot be rendered, too-long ones with `truncation=False`, or
            every pair dropped.
    """
    eos = tokenizer.eos_token
    if eos is None:
        raise ModelError("the tokenizer has no eos_token; preference completions end with one")
    if any(r[0] == "chat" for r in rendered) and getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(
            "task preference: chat-form pairs need a chat template; set tokenizer.chat_template "
            "(chatml, llama3 or a Jinja string)"
        )
    problems = _Problems()
    ids, labels, offsets = array("q"), array("q"), array("q", [0])
    kept: list[int] = []
    dropped: list[int] = []

    def name(i: int) -> str:
        return locations[i] if locations is not None else f"pair {i}"

    for i, (form, prompt, chosen, rejected) in enumerate(rendered):
        if form == "text":
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
        try:
            prompt_ids = _encode(tokenizer, form, prompt, None)
            pair = [_encode(tokenizer, form, prompt, c) for c in (chosen, rejected)]
        except Exception as exc:  # a chat template that raises or fails on the row
            problems.add(f"{name(i)}: the chat template does not render it: {_line(exc)}")
            continue
        start = min(_prefix_length(prompt_ids, seq) for seq in pair)
        longest = max(len(seq) for seq in pair)
        if longest > max_length and not truncation:
            problems.add(
                f"{name(i)}: {longest} tokens (prompt + completion) exceed "
                f"data.max_length={max_length}; raise data.max_length or set data.truncation: true"
            )
            continue
        if start >= max_length or any(len(seq) <= start for seq in pair):
            dropped.append(i)  # no completion token within max_length (or none at all)
            continue
        for seq in pair:
            seq = seq[:max_length]
            ids.extend(seq)
            labels.extend(array("q", [IGNORE_INDEX]) * start)
            labels.extend(seq[start:])
            offsets.append(len(ids))
        kept.append(i)
    problems.raise_if_any()
    n = len(rendered)
    drops = [name(i) for i in dropped]
    report_dropped(what, n, drops, max_length, quiet, items="preference pairs", target="completion")
    rows = torch.tensor(kept, dtype=torch.int64).repeat_interleave(2)  # both of each pair
    return TokenDataset.from_aligned(
        ids, labels, offsets, source_rows=None if len(kept) == n else rows
    )


class PreferenceDataset:
    """N preference pairs over a `TokenDataset` of 2N sequences (chosen 2i, rejected 2i + 1).

    Example i is `{input_ids, labels}` of the chosen sequence and `{rejected_input_ids,
    rejected_labels}` of the rejected one; `collate_preference` batches them.
    """

    blocks = None
    doc_starts = None

    def __init__(self, sequences: TokenDataset) -> None:
        if len(sequences) % 2:
            raise ValueError(f"{len(sequences)} sequences: not chosen/rejected pairs")
        self.sequences = sequences

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        chosen, rejected = self.sequences[2 * i], self.sequences[2 * i + 1]
        return {
            "input_ids": chosen["input_ids"],
            "labels": chosen["labels"],
            "rejected_input_ids": rejected["input_ids"],
            "rejected_labels": rejected["labels"],
        }

    @property
    def num_tokens(self) -> int:
        """Completion tokens of both sides (the targets)."""
        return self.sequences.num_tokens

    @property
    def lengths(self) -> Tensor:
        """Each pair's longer sequence (what its padded batch row costs)."""
        return self.sequences.lengths.view(-1, 2).amax(1)

    @property
    def source_rows(self) -> Tensor | None:
        rows = self.sequences.source_rows
        return None if rows is None else rows[0::2]

    @property
    def has_labels(self) -> bool:
        return True

    @property
    def aligned(self) -> bool:
        return True


def _line(exc: BaseException) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]
