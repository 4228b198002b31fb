"""The data section: sources, task fields and templates, filters, tokenization, batching."""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Literal

from pydantic import Field, model_validator

from kiln.config.base import MAX_COUNT, MAX_TOKENS, Section

__all__ = [
    "AugmentConfig",
    "CurriculumConfig",
    "CurriculumStage",
    "DataConfig",
    "InstructionTemplate",
    "MixtureSource",
    "QualityRamp",
]


class InstructionTemplate(Section):
    prompt: str
    """Prompt format string over the row's fields (list fields joined by newlines)."""
    response: str
    """Response format string; only its tokens carry loss."""


class CurriculumStage(Section):
    until: int | None = Field(None, gt=0, le=MAX_COUNT)
    """The stage lasts until this epoch or step (exclusive; `curriculum.by`); null: to the end."""
    max_difficulty: float | None = None
    """Train only on samples whose difficulty is <= this; null: every difficulty."""


class QualityRamp(Section):
    start: float = Field(ge=0.0, le=1.0)
    """Quality threshold at epoch/step 0: samples scoring below it are not drawn."""
    end: float = Field(ge=0.0, le=1.0)
    """Quality threshold reached after `over` epochs/steps, and kept after."""
    over: int = Field(gt=0, le=MAX_COUNT)
    """Epochs or steps (`curriculum.by`) over which the threshold moves linearly to `end`."""


class CurriculumConfig(Section):
    difficulty: str = "difficulty"
    """Difficulty of a sample: a numeric row field, or `length` (its tokens) or `num_steps`
    (lines of its text that start with a step number, e.g. `3.`)."""
    by: Literal["epoch", "step"] = "epoch"
    """Stages and the quality ramp advance per epoch, or per optimizer step (needs
    train.max_steps)."""
    stages: list[CurriculumStage] = Field(default_factory=list)
    """Staged schedule, easiest first; the last stage must have `until: null`."""
    quality: QualityRamp | None = None
    """Progressive quality threshold on `data.quality_field` (e.g. 0.5 -> 0.75)."""

    @model_validator(mode="after")
    def _check(self) -> CurriculumConfig:
        if not self.stages and self.quality is None:
            raise ValueError("data.curriculum: set stages, quality, or both")
        ends = [st.until for st in self.stages]
        if ends and ends[-1] is not None:
            raise ValueError("data.curriculum.stages: the last stage must have until: null")
        if None in ends[:-1]:
            raise ValueError("data.curriculum.stages: only the last stage may have until: null")
        bounded = [e for e in ends if e is not None]
        if any(b <= a for a, b in pairwise(bounded)):
            raise ValueError("data.curriculum.stages: `until` must increase from stage to stage")
        return self


class AugmentConfig(Section):
    name: str
    """Augmenter by registry name: template_variation, verb_paraphrase, recipe_tip, or one you
    registered with `kiln.data.augment.register_augmenter`."""
    p: float = Field(0.5, ge=0.0, le=1.0)
    """Probability that a sample is augmented by it (drawn per seed, epoch and sample)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Options of the augmenter (e.g. `words` for verb_paraphrase, `tips` for recipe_tip)."""


class MixtureSource(Section):
    path: str | list[str]
    """The source's files, as `data.train` takes them: a file, a glob, or a list of them."""
    weight: float = Field(gt=0.0, le=1e9)
    """Relative weight: the sources' weights are normalized to sum 1, and source k gets that
    share of the training tokens drawn (`0.7` and `0.3`, or `7` and `3`, mix alike)."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """The source's name in data_stats.json and in the metrics (`tokens_seen/<name>`); null:
    its (first) file's name up to the first dot."""

    @property
    def label(self) -> str:
        """`name`, or the stem of the first file (`web` for `data/web.jsonl.gz`)."""
        if self.name is not None:
            return self.name
        first = self.path if isinstance(self.path, str) else self.path[0]
        return first.replace("\\", "/").rsplit("/", 1)[-1].split(".", 1)[0] or "source"


class DataConfig(Section):
    train: str | list[str] | None = None
    """Training data: a file (JSONL, JSON, CSV, Parquet, text), a glob, a list of them, a
    `datasets` dataset saved to disk, or `hf:<hub name>`; null: the Trainer is given the data."""
    sources: list[MixtureSource] | None = Field(None, min_length=1, max_length=1024)
    """A weighted mixture of corpora instead of `train` (`data.storage: shards`): a list of
    `{path, weight, name}`; each source is prepared into its own shard set and split by
    `val_split` on its own; training draws from source k a share weight_k / sum(weights) of
    its tokens (docs/data.md, Mixtures)."""
    val: str | list[str] | None = None
    """Validation data (same forms as `train`); when unset, `val_split` of the training rows."""
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "text", "hf"] = "auto"
    """File format; auto picks it from each file's extension (.jsonl .json .csv .parquet .txt)."""
    hf_split: str = "train"
    """Split to read from a `datasets` dataset (hub name or saved DatasetDict)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops with file:line (error), or is skipped and counted (skip)."""
    val_split: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of training rows held out for validation when `data.val` is unset."""
    text_field: str = "text"
    """Row field holding the text (causal_lm)."""
    source_template: str = "{source}"
    """seq2seq input, a format string over the row's fields (list fields joined by newlines)."""
    target_template: str = "{target}"
    """seq2seq target, a format string over the row's fields (list fields joined by newlines)."""
    prompt_template: str = "{prompt}"
    """instruction: the prompt, a format string over the row's fields (no loss on its tokens)."""
    response_template: str = "{response}"
    """instruction: the response, a format string over the row's fields (the loss is on it)."""
    templates: list[InstructionTemplate] = Field(default_factory=list)
    """instruction: several prompt/response templates, one picked per sample (seeded): mixed
    sample formats. Overrides prompt_template/response_template when set."""
    messages_field: str = "messages"
    """chat: the row field holding the conversation, a list of {role, content} messages (role:
    system, user, assistant or tool)."""
    chat_loss: Literal["assistant", "last", "all"] = "assistant"
    """chat: which tokens carry loss: every assistant turn (with its end-of-turn marker), the
    last assistant turn only, or every token of the rendered conversation."""
    max_length: int = Field(256, gt=1, le=MAX_TOKENS)
    """causal_lm: tokens per packed block (sequence length); seq2seq/instruction: max input
    tokens (instruction: prompt + response)."""
    max_target_length: int = Field(256, gt=1, le=MAX_TOKENS)
    """seq2seq: max target tokens."""
    truncation: bool = True
    """Cut sequences longer than the limits; false makes such a sequence an error."""
    packing: bool = True
    """causal_lm: concatenate documents (EOS-separated) into blocks of max_length tokens.
    chat: pack whole conversations into blocks of max_length (none split; positions restart
    per conversation, no attention across them); validation stays one per example."""
    isolate_documents: bool = True
    """With packing: documents in a block do not attend to each other (position ids restart
    per document), where the model supports it."""
    pad_to_multiple_of: int | None = Field(None, gt=0, le=MAX_TOKENS)
    """Pad each batch's length up to a multiple of this (tensor-core and compile friendly)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding); the order stays seeded."""
    collator: str = "auto"
    """Collator by registry name; auto picks the task's default."""
    cache_dir: str | None = ".kiln_cache"
    """Cache tokenized datasets here, keyed by data, tokenizer and settings; null disables."""
    num_workers: int | None = Field(None, ge=0, le=1024)
    """Worker processes for tokenization (0: in the main process; unset: 0 when tokenizing in
    memory, all cores for `kiln data prepare`)."""
    loader_workers: int = Field(0, ge=0, le=64)
    """Processes that build training batches ahead of the step (DataLoader workers), in the
    data cursor's order: the same batches as without them (0: built in the training process,
    between steps). Pays off when a batch costs a noticeable part of a step (augmentation,
    large ragged batches); not with data.curriculum."""
    storage: Literal["memory", "shards"] = "memory"
    """Where the training tokens live: memory (read, tokenized and held in RAM at each start,
    cached in data.cache_dir) or shards (prepared once into token shards under
    data.cache_dir, `kiln data prepare`, then read by memory map: any corpus size, constant
    memory; every task)."""
    shard_tokens: int = Field(1 << 26, ge=1, le=1 << 32)
    """storage: shards: tokens per shard file (64M: 128 MiB of uint16 ids)."""
    min_quality_score: float | None = Field(None, ge=0.0, le=1.0)
    """Drop rows whose `quality_field` is below this score."""
    quality_field: str = "quality_score"
    """Row field holding the quality score used by `min_quality_score`."""
    dedup: bool = True
    """Drop exact duplicates (by rendered text), keeping the first."""
    min_chars: int | None = Field(None, ge=0, le=MAX_COUNT)
    """Drop rows whose rendered text is shorter than this many characters."""
    max_chars: int | None = Field(100_000, gt=0, le=MAX_COUNT)
    """Drop rows whose rendered text is longer than this many characters; text-file lines are
    cut into rows of this size instead. The default, far above a training document, bounds the
    work per row (JSONL lines over 12 bytes a character + 1 MiB are dropped unparsed); null:
    no limit."""
    max_samples: int | None = Field(None, gt=0, le=MAX_COUNT)
    """Use at most this many training rows (after filtering), for quick experiments."""
    curriculum: CurriculumConfig | None = None
    """Curriculum learning: which training samples may be drawn as training goes on."""
    augment: list[AugmentConfig] = Field(default_factory=list)
    """Augmenters applied in order to each training sample as it is drawn (not to val)."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        lo, hi = self.min_chars, self.max_chars
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"data.min_chars: must be <= data.max_chars ({hi}), got {lo}")
        if self.sources is not None:
            if self.train is not None:
                raise ValueError(
                    "data.sources: a mixture replaces data.train; set one of them, not both"
                )
            names = [s.label for s in self.sources]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(
                    f"data.sources: two sources are named {twice[0]!r}; give each a distinct name"
                )
        return self
