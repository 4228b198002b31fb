"""Tokenizers: train a byte-level BPE on the training text, or load a pretrained one; an id
tokenizer for token-id data given without one.

`build_tokenizer` is the entry point the engine uses: an explicit `tokenizer.name_or_path`, else
the tokenizer shipped with `model.name_or_path`, else a byte-level BPE trained on the training
texts. Whatever it returns has a pad token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kiln.config import RunConfig
from kiln.data.limits import split_text
from kiln.errors import ModelError, first_line
from kiln.files import looks_local

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "build_tokenizer",
    "ensure_pad_token",
    "id_tokenizer",
    "load_tokenizer",
    "looks_local",
    "train_bpe_tokenizer",
]

logger = logging.getLogger("kiln")

EOS_TOKEN = "<|endoftext|>"
"""Bos, eos and unk token of trained tokenizers (GPT-2's convention)."""
PAD_TOKEN = "<|pad|>"
"""Pad token of trained tokenizers; also added to tokenizers with neither pad nor eos."""

# Longest string the BPE trainer is given: it pre-tokenizes a string whole, at ~90 bytes per
# character (a 50 MB single-line file took 4.7 GB). Longer texts are cut where the byte-level
# pre-tokenizer ends a word anyway (`split_text`), so the word counts, and the tokenizer, are
# the same.
_TRAIN_PIECE_CHARS = 10_000
# A corpus this large takes seconds to train on: say so before starting.
_ANNOUNCE_CHARS = 2_000_000


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if len(text) <= _TRAIN_PIECE_CHARS:
            yield text
        else:
            yield from split_text(text, _TRAIN_PIECE_CHARS)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    *,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`.

    Every string encodes (the 256 byte symbols are always in the vocabulary) and decodes back to
    itself exactly. Training is deterministic: the same texts give the same vocabulary. Texts
    longer than 10,000 characters are given to the trainer in pieces cut between words, which
    bounds its memory and gives the same vocabulary.

    Args:
        texts: training strings; iterated once.
        vocab_size: target vocabulary size, special tokens included (smaller if the text runs
            out of merges).
        min_frequency: minimum count of a pair for it to be merged.
        model_max_length: longest sequence the model will take, stored on the tokenizer.

    Returns:
        A fast tokenizer with `<|endoftext|>` as bos/eos/unk and `<|pad|>` as pad.
    """
    tok = Tokenizer(models.BPE())
    # No prefix space: "a" at the start of a text and after a newline encode the same way as
    # the raw bytes, so decode(encode(x)) == x without stripping anything.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_pieces(texts), trainer=trainer)
    return _fast_tokenizer(tok, bos=True, model_max_length=model_max_length)


def id_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer whose tokens are the ids themselves, for token-id data given without one.

    Text is ids separated by whitespace: `"5 7"` encodes to [5, 7], and `decode([5, 7])` is
    `" 5 7"` (each id after a space, so that a continuation appends to its prompt, as BPE
    tokens do). Two special tokens follow the ids: `<|pad|>` (padding) and `<|endoftext|>`
    (eos, and what anything else encodes to; never in the data). It saves with
    `save_pretrained` like any tokenizer; the model's vocabulary covers `vocab_size + 2`.
    """
    # Byte-level "Ġ" (U+0120) is a space: token i is " i", split at whitespace and decoded back.
    vocab = {f"\u0120{i}": i for i in range(vocab_size)}
    vocab[PAD_TOKEN], vocab[EOS_TOKEN] = vocab_size, vocab_size + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return _fast_tokenizer(tok)


def _fast_tokenizer(
    tok: Tokenizer, *, bos: bool = False, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """`tok` (a hand-built `tokenizers.Tokenizer`: trained BPE or ids) as a transformers fast
    tokenizer with kiln's special tokens: `<|endoftext|>` eos and unk (and bos, when `bos`),
    `<|pad|>` pad."""
    specials = {"bos_token": EOS_TOKEN} if bos else {}
    specials.update(eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    if model_max_length is not None:
        specials["model_max_length"] = model_max_length  # type: ignore[assignment]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **specials,
        # The default clean-up rewrites " ," to "," on decode, which breaks exact round trips.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(
    name_or_path: str, *, key: str = "tokenizer.name_or_path"
) -> PreTrainedTokenizerBase:
    """Load a pretrained tokenizer from a local directory or a hub id.

    Args:
        name_or_path: local directory or hub id.
        key: the config key the value came from, named in the error message.

    Raises:
        ModelError: a one-line message when the tokenizer cannot be loaded.
    """
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise ModelError(f"{key}: cannot load tokenizer {name_or_path!r}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser()))
    except Exception as exc:
        # Bad files raise OSError/ValueError/KeyError/TypeError (a JSON list where an object
        # belongs); the Rust tokenizers library reports a tokenizer.json that is JSON but not a
        # tokenizer with a plain Exception. Anything more specific is a bug, not a bad file.
        bad_file = (OSError, ValueError, KeyError, TypeError, ImportError)
        if not isinstance(exc, bad_file) and type(exc) is not Exception:
            raise
        if Path(name_or_path).expanduser().is_dir():
            reason = first_line(exc)
        else:
            reason = "not a local directory and not reachable on the hub"
        raise ModelError(f"{key}: cannot load tokenizer {name_or_path!r}: {reason}") from None


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Give `tokenizer` a pad token if it has none (pad = eos, else a new `<|pad|>`).

    Returns:
        A one-line message describing the change for the caller to log, or None if the
        tokenizer already had a pad token.
    """
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return f"tokenizer has no pad token; padding with its eos token {tokenizer.eos_token!r}"
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return (
        f"tokenizer has no pad or eos token; added {PAD_TOKEN!r} "
        f"(id {tokenizer.pad_token_id}) for padding"
    )


def build_tokenizer(cfg: RunConfig, texts: Iterable[str] | None) -> PreTrainedTokenizerBase:
    """The run's tokenizer: `tokenizer.name_or_path`, else `model.name_or_path`, else trained.

    Args:
        cfg: the run config.
        texts: training texts, used (and then required) only when a tokenizer is trained.

    Raises:
        ModelError: a pretrained tokenizer cannot be loaded.
        ValueError: a tokenizer must be trained but `texts` is None.
    """
    if cfg.tokenizer.name_or_path is not None:
        tokenizer = load_tokenizer(cfg.tokenizer.name_or_path, key="tokenizer.name_or_path")
    elif cfg.model.name_or_path is not None:
        tokenizer = load_tokenizer(cfg.model.name_or_path, key="model.name_or_path")
    else:
        if texts is None:
            raise ValueError("training a tokenizer (no tokenizer.name_or_path) needs texts")
        texts = texts if isinstance(texts, Sequence) else list(texts)
        chars = sum(len(text) for text in texts)
        if chars >= _ANNOUNCE_CHARS:
            logger.info(
                "training a byte-level BPE tokenizer on %s texts (%s characters)...",
                f"{len(texts):,}",
                f"{chars:,}",
            )
        start = time.monotonic()
        tokenizer = train_bpe_tokenizer(
            texts,
            cfg.tokenizer.vocab_size,
            cfg.tokenizer.min_frequency,
            model_max_length=cfg.model.max_position_embeddings,
        )
        logger.info(
            "trained a byte-level BPE tokenizer: %d tokens (%s texts, %s characters, %.1fs)",
            len(tokenizer),
            f"{len(texts):,}",
            f"{chars:,}",
            time.monotonic() - start,
        )
        if len(tokenizer) < cfg.tokenizer.vocab_size:
            logger.warning(
                "tokenizer.vocab_size: %d asked, %d trained: the text has no more pairs seen "
                "tokenizer.min_frequency (%d) times (more text or a lower one gives more)",
                cfg.tokenizer.vocab_size,
                len(tokenizer),
                cfg.tokenizer.min_frequency,
            )
    message = ensure_pad_token(tokenizer)
    if message:
        logger.info(message)
    if cfg.tokenizer.chat_template is not None:
        from kiln.data.chat import set_chat_template

        message = set_chat_template(tokenizer, cfg.tokenizer.chat_template)
        if message:
            logger.info(message)
    return tokenizer
