"""Chat conversations (`task: chat`): rows of messages, rendered with the tokenizer's chat
template, with the loss on the assistant's turns.

A row holds a list of `{role, content}` messages (`data.messages_field`). Checking, filtering
and deduplication see the conversation as canonical JSON (`ChatFormat`); tokenization renders
it with the tokenizer's chat template and marks the characters each assistant turn produced:

- a template with `{% generation %}` markers says so itself (what transformers'
  `return_assistant_tokens_mask` reads, and TRL's SFTTrainer with `assistant_only_loss`);
- any other template is rendered once per assistant turn: the conversation before the turn
  with the generation prompt, then up to and including the turn. The turn is what the second
  adds to the first, less trailing whitespace (the template's separator after the
  end-of-turn marker). Each rendering must be a prefix of the whole conversation's, or the
  row is refused: such a template cannot say which tokens the assistant produced.

The whole text is tokenized at once (as at inference, where the conversation so far is
rendered and tokenized whole) and a token is a target when it holds a character of an
assistant turn, as transformers maps `{% generation %}` spans to tokens.
"""

from __future__ import annotations

import json
import logging
import re
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kiln.data.collate import IGNORE_INDEX
from kiln.data.dataset import TokenDataset
from kiln.data.sources import _Problems, json_type, where
from kiln.data.tasks import _RowError
from kiln.data.tokenize import report_dropped
from kiln.errors import ModelError

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CHAT_TEMPLATES",
    "ROLES",
    "ChatFormat",
    "PackedConversations",
    "chat_prompt",
    "chat_stop_ids",
    "chat_template",
    "conversation_prompt",
    "conversation_text",
    "render_conversation",
    "set_chat_template",
    "tokenize_chat",
]

log = logging.getLogger("kiln")

ROLES = ("system", "user", "assistant", "tool")

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_LLAMA3 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
CHAT_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (_CHATML, ("<|im_start|>", "<|im_end|>")),
    "llama3": (
        _LLAMA3,
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
}
"""Built-in chat templates by name: (Jinja source, the markers it writes)."""

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_template(value: str) -> tuple[str, tuple[str, ...]]:
    """`tokenizer.chat_template` as (Jinja source, markers): a built-in by name, else the
    value itself (a Jinja string, no markers to add)."""
    return CHAT_TEMPLATES.get(value, (value, ()))


def set_chat_template(tokenizer: PreTrainedTokenizerBase, value: str) -> str | None:
    """Give `tokenizer` the chat template `value` (`chat_template`); a built-in's markers the
    vocabulary lacks become special tokens. Returns a line to log when tokens were added."""
    source, markers = chat_template(value)
    tokenizer.chat_template = source
    vocab = tokenizer.get_vocab()
    missing = [m for m in markers if m not in vocab]
    if not missing:
        return None
    tokenizer.add_special_tokens({"additional_special_tokens": missing})  # type: ignore[dict-item]
    return f"tokenizer.chat_template {value}: added {', '.join(missing)} as special tokens"


@dataclass(frozen=True)
class ChatFormat:
    """chat: the row's `messages_field`, checked and rendered as canonical JSON (the text that
    filters, deduplication and the tokenization cache see; `tokenize_chat` renders it with
    the chat template)."""

    messages_field: str = "messages"
    parts: ClassVar[tuple[str, ...]] = ("conversation",)

    def render(self, row: Mapping[str, Any], index: int) -> tuple[str]:
        """The row's conversation as JSON (see `TaskFormat.render`)."""
        at, key = where(row, index), self.messages_field
        if key not in row:
            raise _RowError(f"{at}: missing field '{key}'")
        messages = row[key]
        if not isinstance(messages, list):
            raise _RowError(
                f"{at}: field '{key}' must be a list of messages, got {json_type(messages)}"
            )
        if not messages:
            raise _RowError(f"{at}: field '{key}' is an empty conversation")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise _RowError(f"{at}: {key}[{i}] must be an object, got {json_type(message)}")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise _RowError(
                    f"{at}: {key}[{i}].role: unknown role {role!r} (expected one of "
                    f"{', '.join(ROLES)})"
                )
            if not isinstance(content, str):
                raise _RowError(
                    f"{at}: {key}[{i}].content must be a string, got {json_type(content)}"
                )
            out.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in out):
            raise _RowError(f"{at}: the conversation has no assistant turn (nothing to learn)")
        return (json.dumps(out, ensure_ascii=False),)


def conversation_text(rendered: str) -> str:
    """The messages' contents, one per line: what a tokenizer trained for chat learns from."""
    return "\n".join(m["content"] for m in json.loads(rendered))


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with the tokenizer's chat template, and the character spans
    [start, end) of its assistant turns, in order (see the module docstring).

    Raises:
        ValueError: the template does not render, or renders turns inconsistently.
    """
    template = tokenizer.chat_template
    if _GENERATION.search(template):
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(
            conversations=[messages],
            chat_template=template,
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
        return rendered[0], [tuple(span) for span in indices[0]]  # type: ignore[misc]

    def render(upto: list[dict[str, str]], prompt: bool) -> str:
        return tokenizer.apply_chat_template(upto, tokenize=False, add_generation_prompt=prompt)  # type: ignore[return-value]

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        with_turn = render(messages[: i + 1], False)
        if i == 0:  # nothing before it to render: the turn starts where its content does
            start = with_turn.find(message["content"])
            before = with_turn[: max(start, 0)]
        else:
            before = render(messages[:i], True)
        if not with_turn.startswith(before) or not text.startswith(with_turn):
            raise ValueError(
                "the chat template renders a conversation's beginning differently from the "
                "whole; add {% generation %} markers around the assistant turns"
            )
        end = len(with_turn.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user: str, *, system: str | None = None) -> str:
    """A user message (after an optional system message) rendered with the chat template and
    its generation prompt: the text an assistant's reply continues."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user})
    return conversation_prompt(tokenizer, messages)


def conversation_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The conversation so far rendered with the chat template and its generation prompt."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[return-value]


def chat_stop_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The token that ends an assistant turn in this template (what follows a reply's text
    in its rendered turn, when that is one token): where generating a reply stops."""
    reply = "Fine."
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    try:
        text, spans = render_conversation(tokenizer, messages)
    except Exception:  # no template, or one that cannot render this: EOS alone ends a reply
        return ()
    if not spans:
        return ()
    start, end = spans[-1]
    turn = text[start:end]
    tail = turn[turn.find(reply) + len(reply) :] if reply in turn else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    return (int(ids[0]),) if len(ids) == 1 else ()


def _token_spans(
    encoding: Any, row: int, spans: list[tuple[int, int]], n: int
) -> list[tuple[int, int]]:
    """Character spans as token spans [start, end) of row `row` of a batch encoding: from the
    token holding the first character to the one holding the last (transformers' rule for
    `{% generation %}` spans)."""
    out = []
    for start, end in spans:
        first = encoding.char_to_token(row, start)
        if first is None:
            continue
        last = encoding.char_to_token(row, end - 1)
        out.append((first, n if last is None else last + 1))
    return out


def _cut(spans: list[tuple[int, int]], max_length: int) -> tuple[int, list[tuple[int, int]]] | None:
    """Where a too-long conversation is cut, and its spans then: after the last assistant turn
    that fits whole (earlier turns stay whole); else inside the first turn, its prompt whole
    (the turn is cut from its end); None when not even one of the first turn's tokens fits
    after its prompt."""
    whole = [s for s in spans if s[1] <= max_length]
    if whole:
        return whole[-1][1], whole
    start, _ = spans[0]
    if start >= max_length:
        return None
    return max_length, [(start, max_length)]


def tokenize_chat(
    conversations: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    loss: str = "assistant",
    truncation: bool = True,
    *,
    locations: Sequence[str] | None = None,
    what: str = "data",
    quiet: bool = False,
) -> TokenDataset:
    """Tokenize conversations (`ChatFormat`'s JSON) with the loss on their assistant turns.

    input_ids: the rendered conversation (the template writes every marker, so no EOS is
    added); labels aligned with them, -100 off the trained tokens: the assistant turns with
    their end-of-turn markers (`loss="assistant"`), the last one only (`"last"`), or every
    token (`"all"`).

    Longer than `max_length` tokens: with `truncation`, cut after the last assistant turn
    that fits whole, so earlier turns stay whole and no prompt is ever cut; when even the
    first turn does not fit, it is cut from its end (its prompt whole), as instruction cuts a
    response; a conversation whose first prompt leaves no room is dropped (logged). Without,
    each too-long conversation is a DataError naming it.

    Raises:
        ModelError: the tokenizer has no chat template.
        DataError: conversations the template cannot render (each named), too-long ones with
            `truncation=False`, or every conversation dropped.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(
            "task chat: the tokenizer has no chat template; set tokenizer.chat_template "
            "(chatml, llama3 or a Jinja string)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError("task chat: needs a fast tokenizer (it maps characters to tokens)")
    problems = _Problems()
    dropped: list[int] = []

    def name(i: int) -> str:
        return locations[i] if locations is not None else f"conversation {i}"

    texts, char_spans = [], []
    for i, conversation in enumerate(conversations):
        try:
            text, spans = render_conversation(tokenizer, json.loads(conversation))
        except Exception as exc:  # Jinja errors, raise_exception() in a template, bad spans
            problems.add(f"{name(i)}: the chat template does not render it: {_line(exc)}")
            continue
        texts.append((i, text))
        char_spans.append(spans)
    problems.raise_if_any()

    ids, labels, offsets = array("q"), array("q"), array("q", [0])
    kept: list[int] = []
    for batch_start in range(0, len(texts), 1024):
        batch = texts[batch_start : batch_start + 1024]
        encoding = tokenizer([t for _, t in batch], add_special_tokens=False, verbose=False)
        for row, (i, _) in enumerate(batch):
            tokens = encoding["input_ids"][row]
            spans = _token_spans(encoding, row, char_spans[batch_start + row], len(tokens))
            if not spans:
                problems.add(f"{name(i)}: no assistant token in the rendered conversation")
                continue
            end = len(tokens)
            if end > max_length:
                if not truncation:
                    problems.add(
                        f"{name(i)}: {end} tokens exceed data.max_length={max_length}; raise "
                        "data.max_length or set data.truncation: true"
                    )
                    continue
                cut = _cut(spans, max_length)
                if cut is None:
                    dropped.append(i)
                    continue
                end, spans = cut
            if loss == "last":
                spans = spans[-1:]
            target = array("q", tokens[:end])
            mask = array("q", target) if loss == "all" else array("q", [IGNORE_INDEX]) * end
            if loss != "all":
                for start, stop in spans:
                    mask[start:stop] = target[start:stop]
            if all(x == IGNORE_INDEX for x in mask[1:]):  # the first label is never predicted
                dropped.append(i)
                continue
            ids.extend(target)
            labels.extend(mask)
            offsets.append(len(ids))
            kept.append(i)
    problems.raise_if_any()
    n = len(conversations)
    drops = [name(i) for i in dropped]
    report_dropped(what, n, drops, max_length, quiet, items="conversations", target="assistant")
    source_rows = None if len(kept) == n else torch.tensor(kept, dtype=torch.int64)
    return TokenDataset.from_aligned(ids, labels, offsets, source_rows=source_rows)


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


class PackedConversations:
    """Conversations packed whole into blocks of `length` tokens (`data.packing` with task
    chat): no conversation is split, so each keeps its positions and its turns.

    The blocks are filled best-fit decreasing (longest conversation first, each into the block
    it fills most; ties by order), deterministically. A block is its conversations end to end,
    then padding to `length`; `position_ids` restart at 0 for each conversation and for the
    padding, and the batch has no attention mask, so transformers builds a block-diagonal
    causal mask from the position ids: no conversation attends to another (docs/post_training.md
    says which attention implementations read them). Labels are the conversations' own (-100
    off the assistant turns) and -100 on the padding, so the loss sums are those of the
    conversations unpacked.
    """

    blocks = None
    doc_starts = None

    def __init__(self, conversations: TokenDataset, length: int, pad_id: int) -> None:
        self.conversations, self.length, self.pad_id = conversations, length, pad_id
        sizes = conversations.lengths.tolist()
        too_long = [i for i, n in enumerate(sizes) if n > length]
        if too_long:
            raise ValueError(f"conversation {too_long[0]} is longer than the block ({length})")
        self.bins = _best_fit_decreasing(sizes, length)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.batch(torch.tensor([i]), squeeze=True)

    def batch(self, indices: Tensor, *, squeeze: bool = False) -> dict[str, Tensor]:
        """The blocks at `indices` as (B, length) tensors: input_ids, labels, position_ids;
        and real_tokens (B,): each block's tokens before its padding (for throughput)."""
        n = len(indices)
        real = torch.zeros(n, dtype=torch.int64)
        ids = torch.full((n, self.length), self.pad_id, dtype=torch.int64)
        labels = torch.full((n, self.length), IGNORE_INDEX, dtype=torch.int64)
        positions = torch.zeros((n, self.length), dtype=torch.int64)
        for row, b in enumerate(indices.tolist()):
            at = 0
            for c in self.bins[b]:
                example = self.conversations[c]
                k = len(example["input_ids"])
                ids[row, at : at + k] = example["input_ids"]
                labels[row, at : at + k] = example["labels"]
                positions[row, at : at + k] = torch.arange(k)
                at += k
            positions[row, at:] = torch.arange(self.length - at)  # the padding: its own run
            real[row] = at
        out = {"input_ids": ids, "labels": labels, "position_ids": positions, "real_tokens": real}
        return {k: v[0] for k, v in out.items()} if squeeze else out

    @property
    def num_tokens(self) -> int:
        return self.conversations.num_tokens

    @property
    def lengths(self) -> Tensor:
        return torch.full((len(self.bins),), self.length, dtype=torch.int64)

    @property
    def source_rows(self) -> Tensor | None:
        return None  # a block holds several rows

    has_labels = True
    aligned = True


def _best_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to <= capacity: items longest first, each into the
    open bin it leaves least room in (a new bin when none fits)."""
    import bisect

    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in order:
        at = bisect.bisect_left(free, (sizes[i], -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - sizes[i], len(bins) - 1))
            continue
        room, b = free.pop(at)
        bins[b].append(i)
        bisect.insort(free, (room - sizes[i], b))
    return [sorted(b) for b in bins]  # each block's conversations in their data order
