"""Limits on the work one data row may cost, whatever the file holds.

Data files come from anywhere, and one hostile row should cost a line of error, not a
traceback, gigabytes or an hour: JSON nested thousands of levels deep (json.loads raises
RecursionError), an integer of thousands of digits (Python refuses to convert it), or a
50 MB line (parsing, tokenizer training and tokenizing it take gigabytes). Readers parse JSON
with `parse_json_line`, skip lines over `max_line_bytes`, and cut long text with `split_text`.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "TOO_DEEP",
    "json_hazard",
    "json_problem",
    "max_line_bytes",
    "openers",
    "parse_json_line",
    "split_text",
    "too_deep",
    "too_many_digits",
]

MAX_DEPTH = 100
"""Deepest nesting of arrays and objects a JSON row may have. Training rows nest a few levels;
deeper is broken or hostile data, and near Python's recursion limit (~1000) parsing, rendering
(`str` of a nested list) or pickling the row raises RecursionError."""

# Most bytes one character of a JSON string can take: an escaped astral character such as
# "\ud83d\ude00" is 12 bytes for one Python character.
_MAX_BYTES_PER_CHAR = 12
# Room for the fields a row holds besides its text (ids, metadata, ...).
_LINE_SLACK_BYTES = 1 << 20


def max_line_bytes(max_chars: int | None) -> int | None:
    """Longest JSONL line (in bytes) parsed under `data.max_chars`; None when there is no limit.

    A longer line cannot render to `max_chars` characters unless most of it is fields the task
    does not use; it is dropped unparsed, as json.loads on a 50 MB line costs gigabytes.
    """
    if max_chars is None:
        return None
    return _MAX_BYTES_PER_CHAR * max_chars + _LINE_SLACK_BYTES


TOO_DEEP = f"arrays/objects nested more than {MAX_DEPTH} levels deep"
"""The problem named for a row nested deeper than `MAX_DEPTH`."""


def json_problem(exc: json.JSONDecodeError) -> str:
    """json's message for a syntax error, with its column, e.g. `Expecting value at column 9`."""
    # json's messages may end in " at" ("Unterminated string starting at"): no "at at".
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"


def too_many_digits() -> str:
    """The problem named for an integer longer than Python converts."""
    # Python refuses longer digit strings (CVE-2020-10735); json.loads then raises a plain
    # ValueError whose advice (sys.set_int_max_str_digits) is not for our users.
    return f"invalid JSON (an integer with more than {sys.get_int_max_str_digits()} digits)"


def openers(text: str, start: int = 0, end: int | None = None) -> int:
    """`[` and `{` in text[start:end]: at least the nesting depth of the JSON there."""
    end = len(text) if end is None else end
    return text.count("[", start, end) + text.count("{", start, end)


def too_deep(value: Any) -> bool:
    """Whether arrays/objects nest more than `MAX_DEPTH` levels in `value` (walked without
    recursion, so any depth is safe to check)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > MAX_DEPTH:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json_line(text: str) -> tuple[Any, str | None]:
    """(value, None) for a line of JSON, or (None, what is wrong with it)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({json_problem(exc)})"
    except RecursionError:  # nested ~1000 levels: json's C parser gives up
        return None, TOO_DEEP
    except ValueError:  # the only other failure: an int past Python's digit limit
        return None, too_many_digits()
    # Counting brackets is cheap and bounds the depth from above: only a line with many of
    # them needs the walk over its values.
    if openers(text) > MAX_DEPTH and isinstance(value, (dict, list)) and too_deep(value):
        return None, TOO_DEEP
    return value, None


# A string (whole, so brackets and digits inside it do not count), a bracket, or a number.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[{]|[\]}]|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?')


def json_hazard(text: str) -> tuple[int, str] | None:
    """(offset, problem) of the first place where a JSON text nests deeper than `MAX_DEPTH`
    or holds an integer too long to convert, or None. For locating the error json.loads
    raised without a position: a scan of the whole text in Python, so only after a failure.
    """
    depth, digits = 0, sys.get_int_max_str_digits()
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        unsigned = token.lstrip("-")
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                return match.start(), TOO_DEEP
        elif token in ("]", "}"):
            depth -= 1
        # Only an int has the limit (0: none): json.loads reads floats of any length.
        elif 0 < digits < len(unsigned) and unsigned.isdigit():
            return match.start(), too_many_digits()
    return None


# Where `split_text` may cut: before a whitespace character that a non-whitespace one follows.
# GPT-2-style pre-tokenizers (byte-level BPE) end a word there too, so the pieces hold the same
# words as the text. Only ASCII whitespace: a character Python calls whitespace but the
# tokenizers' regex does not (\x1c-\x1f) must not start a piece.
_BREAK = re.compile(r"[ \t\n\r\f\v](?=\S)")
# Characters before a piece's end searched for a break first; most text has one close by.
_BREAK_LOOKBACK = 256


def _last_break(text: str, lo: int, hi: int) -> int | None:
    """The largest offset p in [lo, hi] where `_BREAK` matches, or None."""
    width = _BREAK_LOOKBACK
    while True:
        start = max(lo, hi - width)
        found = None
        # endpos hi + 2: the lookahead may read the character after a break at hi.
        for match in _BREAK.finditer(text, start, hi + 2):
            if match.start() <= hi:
                found = match.start()
        if found is not None or start == lo:
            return found
        width *= 16


def split_text(text: str, max_chars: int) -> list[str]:
    """`text` cut into pieces of at most `max_chars` characters that join back into it.

    Each cut is at the last place within the limit where a whitespace character is followed
    by a non-whitespace one, so words stay whole and the piece after it starts with the
    whitespace (" word"); a stretch of `max_chars` characters without such a place (no
    spaces: code, base64, Chinese) is cut at the limit.

    Args:
        text: any string.
        max_chars: the longest piece, >= 1.

    Returns:
        [text] when it fits, else its pieces in order.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars  # the piece is text[start:cut], cut <= end
        cut = _last_break(text, start + 1, end)
        if cut is None:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
