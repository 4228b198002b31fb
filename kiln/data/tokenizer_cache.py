"""A trained tokenizer kept beside the tokenized data: `data.cache_dir/tokenizer-<key>/`.

Training a BPE tokenizer on the training texts takes longer than reading the tokenized data back
from the cache, so a run whose data comes from the cache takes its tokenizer from there too. The
key hashes what decides the trained tokenizer: the training texts, `tokenizer.vocab_size` and
`min_frequency`, the model's context length (the tokenizer's model_max_length), the tokenizers
and transformers versions and the source of kiln's tokenizer code. An entry is written
atomically (a temporary directory renamed into place); one that cannot be loaded, or loads as a
different tokenizer than it recorded, is removed and the tokenizer trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.data.cache import WarningCapture, tokenizer_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kiln.config import RunConfig

__all__ = ["cached_tokenizer", "tokenizer_key"]

log = logging.getLogger("kiln")

_VERSION = 1


def tokenizer_key(cfg: RunConfig, texts: Sequence[str]) -> str:
    """Hex key of the tokenizer trained on `texts` under `cfg`."""
    import tokenizers
    import transformers

    from kiln.models import tokenizer as code

    h = hashlib.blake2b(digest_size=20)
    head = {
        "version": _VERSION,
        "vocab_size": cfg.tokenizer.vocab_size,
        "min_frequency": cfg.tokenizer.min_frequency,
        "model_max_length": cfg.model.max_position_embeddings,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }
    if cfg.tokenizer.chat_template is not None:  # its markers join the vocabulary
        head["chat_template"] = cfg.tokenizer.chat_template
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(Path(code.__file__ or "").read_bytes())
    for text in texts:
        raw = text.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def _load(path: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer of the entry at `path`, or None (missing; unreadable: removed)."""
    if not path.is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        meta = json.loads((path / "kiln_tokenizer.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer_fingerprint(tokenizer) != meta["fingerprint"]:
            raise ValueError("it loads as another tokenizer than the one saved")
    except Exception as exc:  # any failure to read back means: train again
        log.warning("ignoring unreadable cached tokenizer %s (%s); training it again", path, exc)
        shutil.rmtree(path, ignore_errors=True)
        return None
    for message in meta.get("warnings", []):
        log.warning("%s", message)
    return tokenizer


def _save(path: Path, tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name[:22]}-", dir=path.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "kiln_tokenizer.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path)  # fails if another process already put the entry there
    except OSError as exc:
        if not path.is_dir():
            log.warning("could not cache the tokenizer in %s (%s)", path, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_tokenizer(
    cfg: RunConfig,
    texts: Sequence[str],
    build: Callable[[RunConfig, Sequence[str]], PreTrainedTokenizerBase],
) -> PreTrainedTokenizerBase:
    """`build(cfg, texts)`, or the tokenizer it made before from the same texts and settings.

    Only a tokenizer kiln trains is cached (not `tokenizer.name_or_path` or
    `model.name_or_path`, which load from disk anyway), and only with `data.cache_dir` set.
    """
    trained = cfg.tokenizer.name_or_path is None and cfg.model.name_or_path is None
    if cfg.data.cache_dir is None or not trained:
        return build(cfg, texts)
    start = time.perf_counter()
    path = Path(cfg.data.cache_dir).expanduser() / f"tokenizer-{tokenizer_key(cfg, texts)}"
    tokenizer = _load(path)
    if tokenizer is not None:
        log.info(
            "tokenizer from cache %s: %d tokens (%.2fs; trained on these %s texts before)",
            path,
            len(tokenizer),
            time.perf_counter() - start,
            f"{len(texts):,}",
        )
        return tokenizer
    capture = WarningCapture()
    log.addHandler(capture)
    try:
        tokenizer = build(cfg, texts)
    finally:
        log.removeHandler(capture)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is not None:
        meta = {"version": _VERSION, "fingerprint": fingerprint, "warnings": capture.messages}
        _save(path, tokenizer, meta)
    return tokenizer
