"""Data pipeline: source rows -> checks and filters -> split -> task format -> tokens -> batches.

Typical use::

    train_ds, val_ds, stats = prepare_data(cfg, tokenizer)
    cursor = BatchCursor(len(train_ds), cfg.train.batch_size, cfg.seed)
    batch = collate([train_ds[i] for i in cursor.next_indices()], tokenizer.pad_token_id, cfg.task)
"""

from kiln.data.collate import IGNORE_INDEX, collate, pad_sequences
from kiln.data.dataset import TokenDataset
from kiln.data.prepare import (
    DataStats,
    build_datasets,
    dedup_mask,
    load_eval_data,
    load_splits,
    prepare_data,
    quality_mask,
    split_indices,
)
from kiln.data.python import rows_from_python
from kiln.data.sampler import BatchCursor, batches_per_epoch, epoch_permutation, sequential_batches
from kiln.data.sources import (
    READERS,
    BadRows,
    IndexRow,
    ReadOptions,
    Row,
    read_jsonl,
    read_rows,
)
from kiln.data.tasks import (
    CausalFormat,
    InstructionFormat,
    Seq2SeqFormat,
    TaskFormat,
    make_format,
    render_rows,
    render_template,
)
from kiln.data.tokenize import tokenize_causal, tokenize_instruction, tokenize_seq2seq

__all__ = [
    "IGNORE_INDEX",
    "READERS",
    "BadRows",
    "BatchCursor",
    "CausalFormat",
    "DataStats",
    "IndexRow",
    "InstructionFormat",
    "ReadOptions",
    "Row",
    "Seq2SeqFormat",
    "TaskFormat",
    "TokenDataset",
    "batches_per_epoch",
    "build_datasets",
    "collate",
    "dedup_mask",
    "epoch_permutation",
    "load_eval_data",
    "load_splits",
    "make_format",
    "pad_sequences",
    "prepare_data",
    "quality_mask",
    "read_jsonl",
    "read_rows",
    "render_rows",
    "render_template",
    "rows_from_python",
    "sequential_batches",
    "split_indices",
    "tokenize_causal",
    "tokenize_instruction",
    "tokenize_seq2seq",
]
