"""Validation, generation eval, early stopping, checkpoint and export sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kiln.config.base import MAX_BATCH, MAX_COUNT, MAX_SECONDS, MAX_TOKENS, Section

__all__ = [
    "CheckpointConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "ExportConfig",
    "GenerateEvalConfig",
]


class GenerateEvalConfig(Section):
    num_samples: int = Field(0, ge=0, le=MAX_COUNT)
    """Validation rows to generate from at each validation; 0 turns generation eval off."""
    metrics: list[str] = Field(default_factory=lambda: ["bleu", "rouge"])
    """Metrics by registry name (bleu, rouge, recipe, or "module:function"); logged as val_*."""
    every_steps: int | None = Field(None, gt=0, le=MAX_COUNT)
    """Generate only at validations on multiples of this step (and the last); null: at every
    validation."""
    max_new_tokens: int = Field(128, gt=0, le=MAX_TOKENS)
    """Tokens to generate per sample at most."""
    do_sample: bool = False
    """Sample (temperature, top_p) instead of greedy decoding."""
    temperature: float = Field(0.7, gt=0.0)
    """Sampling temperature (with do_sample)."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Nucleus sampling mass (with do_sample)."""
    batch_size: int = Field(8, gt=0, le=MAX_BATCH)
    """Samples generated together (left-padded for causal models)."""
    max_time_s: float | None = Field(None, gt=0.0, le=MAX_SECONDS)
    """Time budget of one generation eval: it skips whole samples, never cuts one (the batch in
    progress keeps only its finished samples, later batches are skipped); the scores cover the
    complete samples, counted in val_gen_samples_scored."""
    prompt_split: str = "\n"
    """causal_lm: a row's text is split after the first occurrence of this marker into the
    prompt (up to and including it) and the reference (the rest); rows without it are skipped.
    instruction and seq2seq use the rendered prompt/source and response/target."""
    write_samples: bool = True
    """Write prompt, reference and generation of each sample to samples/step-<N>.jsonl."""


class EarlyStoppingConfig(Section):
    enabled: bool = False
    """Stop when `metric` has not improved for `patience` validations."""
    metric: str = "val_loss"
    """Validation metric to watch (val_loss, val_ppl, val_accuracy, val_bleu, ...)."""
    mode: Literal["min", "max"] = "min"
    """Whether a smaller or larger `metric` is better."""
    patience: int = Field(3, ge=1, le=MAX_COUNT)
    """Validations without improvement after which training stops."""
    min_delta: float = Field(0.0, ge=0.0)
    """An improvement must beat the best value by more than this."""


class EvalConfig(Section):
    every_steps: int | None = Field(None, gt=0, le=MAX_COUNT)
    """Validate every N optimizer steps (and always at the end); null: only at the end."""
    every_epochs: int | None = Field(None, gt=0, le=MAX_COUNT)
    """Also validate at the end of every N-th epoch (pass over the training data)."""
    max_batches: int | None = Field(None, gt=0, le=MAX_COUNT)
    """Bound each validation to this many global batches (batch_size x ranks samples): the
    same samples at any world size."""
    batch_size: int | None = Field(None, gt=0, le=MAX_BATCH)
    """Validation batch size per rank; default train.batch_size."""
    sample_prompt: str | None = None
    """Prompt to generate a sample from at the end of training (printed, and in summary.json)."""
    sample_max_new_tokens: int = Field(200, gt=0, le=MAX_TOKENS)
    """Tokens to generate for the end-of-training sample."""
    generate: GenerateEvalConfig = GenerateEvalConfig()
    """Generation-based evaluation (BLEU, ROUGE, recipe scores) on validation rows."""
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    """Stop training when a validation metric stops improving."""


class CheckpointConfig(Section):
    every_steps: int | None = Field(None, gt=0, le=MAX_COUNT)
    """Save a checkpoint every N optimizer steps (and at the last step)."""
    every_epochs: int | None = Field(None, gt=0, le=MAX_COUNT)
    """Also save one at the end of every N-th epoch."""
    every_minutes: float | None = Field(30.0, gt=0.0, le=MAX_SECONDS / 60)
    """Also save one at the first step that ends this many minutes of training after the last
    checkpoint, so a crash loses at most about this much work whatever the other settings;
    null: no time-based checkpoints. On N ranks the main rank's clock decides."""
    keep_last: int = Field(3, ge=1, le=MAX_COUNT)
    """Keep this many most recent checkpoints."""
    keep_best: int = Field(0, ge=0, le=MAX_COUNT)
    """Also keep this many best checkpoints by `metric` (a checkpoint is written whenever a
    validation sets a new best)."""
    metric: str = "val_loss"
    """Metric that ranks checkpoints for keep_best (and picks final: best)."""
    mode: Literal["min", "max"] = "min"
    """Whether a smaller or larger `metric` is better."""
    resume: Literal["never", "auto"] = "never"
    """auto: continue from the newest complete checkpoint in the run directory, if any."""
    final: Literal["last", "best"] = "last"
    """What final/ holds: the weights of the last step, or of the best checkpoint by
    `metric` (needs validation and keep_best >= 1)."""

    @model_validator(mode="after")
    def _check(self) -> CheckpointConfig:
        if self.final == "best" and self.keep_best < 1:
            raise ValueError(
                f"checkpoint.final: best needs checkpoint.keep_best >= 1, got {self.keep_best}"
            )
        return self


class ExportConfig(Section):
    formats: list[Literal["onnx", "torchscript", "pt2"]] = Field(default_factory=lambda: ["onnx"])
    """Formats `kiln export` writes at the end of training (with `on_finish`)."""
    on_finish: bool = False
    """Export final/ into <run_dir>/export when training finishes, checked against PyTorch
    as `kiln export` checks it (docs/export.md); a failed check is logged with its report,
    and the run stays finished."""
    atol: float = Field(1e-4, gt=0.0)
    """Largest max abs logit difference from PyTorch allowed."""
    opset: int = Field(18, ge=7, le=30)
    """ONNX opset."""

    @model_validator(mode="after")
    def _some_format(self) -> ExportConfig:
        if not self.formats:
            raise ValueError("export.formats: name at least one format (onnx, torchscript, pt2)")
        return self
