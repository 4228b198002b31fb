"""Token shards on disk: flat token files memmapped by `ShardSet`, written by `ShardWriter`.

    key = shard_key([source_identity(p) for p in paths], settings, fingerprint)
    with ShardWriter(directory, vocab_size, key, fingerprint) as writer:
        for ids in documents:
            writer.add(ids)
    shards = ShardSet.open(directory, expect_key=key, expect_tokenizer=fingerprint)
    shards.doc(0)  # numpy view of document 0's token ids

The layout (format.py) is documented for other tools in docs/data.md, "Token shards".
"""

from kiln.data.shards.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    dtype_for,
    read_manifest,
    shard_key,
    shard_name,
    source_identity,
)
from kiln.data.shards.reader import ShardSet
from kiln.data.shards.writer import DEFAULT_SHARD_TOKENS, ShardWriter

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "ShardSet",
    "ShardWriter",
    "dtype_for",
    "read_manifest",
    "shard_key",
    "shard_name",
    "source_identity",
]
