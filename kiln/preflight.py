"""Check before you load: what a config names, checked before torch, transformers or the data.

`kiln train` (`kiln.commands.train.check`) and `kiln config validate` call `preflight` right
after the config's own values validated, so the mistakes people make most are answered in
well under a second, all at once, one line each naming its key path, instead of after
seconds of imports and data loading. Each check is a rule the run applies again later, taken
from where the run applies it, so the two cannot disagree; what passes here may still be
refused by the run (see "Not checked"), never the other way round.

Checked (cheap: a few `stat` calls, manifests read; nothing imported):

- `data.train`, `data.val`, `data.sources.<k>.path`: each file or directory exists, each glob
  matches something (`kiln.files.expand_source`, the data pipeline's rule);
- `model.name_or_path`: a local path (an existing directory, or `kiln.files.looks_local`:
  starting with `/`, `.` or `~`) is a directory holding config.json, what the model loader
  reads first; `tokenizer.name_or_path`: a local path is a directory;
- `output_dir` (`run_dir=True`): not a file (`kiln.runs.not_a_directory`), and holding no run
  unless `--overwrite` or the run continues there (`kiln.runs.held_run`);
- `--resume` and `checkpoint.resume: auto`: the checkpoint or run named holds a complete
  checkpoint (`kiln.checkpoint.resume_plan`, with manifests and file sizes, not checksums);
- extras (`kiln.registry.missing_extra`, found without importing them): peft for
  `lora.enabled`, the tracker's package for each of `log.loggers`, sacrebleu / rouge-score for
  the `bleu` / `rouge` of generation eval, onnx, onnxscript and onnxruntime for
  `export.on_finish` with the onnx format.

Not checked here (the run checks them when it gets there): hub ids (`gpt2`, `org/name`) and
`hf:` datasets (`data.format: hf` too): that needs the network; what files hold (rows, the
tokenizer's files, a model's weights); checkpoint checksums (gigabytes to read) and whether
a checkpoint fits the config; the device (CUDA, and bitsandbytes for `lora.qlora`, which only
a CUDA run can use); `eval.generate.metrics` given as import paths, and a run directory
locked by a live run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.checkpoint import CheckpointManager, resume_plan
from kiln.errors import DataError, KilnError
from kiln.files import HF_PREFIX, expand_source, looks_local, resolve_path
from kiln.registry import missing_extra
from kiln.runs import RunPaths, held_run, held_run_refusal, not_a_directory

if TYPE_CHECKING:
    from kiln.config import RunConfig

__all__ = [
    "ONNX_MODULES",
    "config_problems",
    "preflight",
    "preflight_problems",
    "run_dir_problems",
]

ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
"""What ONNX export imports (`kiln.export.graph`), installed by the `export` extra."""


def preflight(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    resume: str | Path | bool | None = None,
    run_dir: bool = True,
) -> None:
    """Check what `cfg` names before anything heavy loads (`preflight_problems`).

    Raises:
        KilnError: every problem found, one line each.
    """
    problems = preflight_problems(cfg, overwrite=overwrite, resume=resume, run_dir=run_dir)
    if problems:
        raise KilnError(problems)


def preflight_problems(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    resume: str | Path | bool | None = None,
    run_dir: bool = True,
) -> list[str]:
    """Every problem of the paths, run directory and extras `cfg` names, one line each naming
    its key path (or `--resume`), in the order data, model, extras, run directory.

    Args:
        cfg: a validated config.
        overwrite: `kiln train --overwrite`: an earlier run in output_dir may be replaced.
        resume: `kiln train --resume`: None (not given: `checkpoint.resume` decides), True
            (the run's newest complete checkpoint), or a run directory or checkpoint.
        run_dir: also apply the run directory's own rule (not a file; no run in it unless
            replaced or continued), as the main rank does when it claims the directory.
    """
    return [
        *config_problems(cfg),
        *_checked("output_dir", _run_problems, cfg, overwrite, resume, run_dir),
    ]


def config_problems(cfg: RunConfig) -> list[str]:
    """What does not depend on how a run is started: the data files, the model and
    tokenizer directories and the extras `cfg` names (`preflight_problems` less the run
    directory). `kiln sweep` checks its base config with it before the first trial."""
    return [*_data_problems(cfg), *_model_problems(cfg), *_extra_problems(cfg)]


def run_dir_problems(
    cfg: RunConfig, *, overwrite: bool = False, resume: str | Path | bool | None = None
) -> list[str]:
    """The problems of output_dir and the checkpoint resumed (`preflight_problems`' last part):
    what `kiln train` with these flags would refuse."""
    return _checked("output_dir", _run_problems, cfg, overwrite, resume, True)


def _checked(key: str, check: Callable[..., list[str]], *args: object) -> list[str]:
    """`check(*args)`'s problems; an error while looking is one line too (an OS error: a
    name too long, a folder that may not be read; a path that cannot be resolved)."""
    try:
        return check(*args)
    except KilnError as exc:
        return exc.problems
    except (OSError, ValueError) as exc:
        what = getattr(exc, "filename", None)
        where = f"{what}: " if what else ""
        return [f"{key}: {where}cannot check ({getattr(exc, 'strerror', None) or exc})"]


def _data_problems(cfg: RunConfig) -> list[str]:
    data = cfg.data
    if data.format == "hf":  # every source is a dataset, by hub name or saved directory
        return []
    named: list[tuple[str, str | list[str] | None]] = [
        ("data.train", data.train),
        ("data.val", data.val),
    ]
    for k, source in enumerate(data.sources or []):  # a mixture's
        named.append((f"data.sources.{k}.path", source.path))
    problems = []
    for key, value in named:
        for spec in [value] if isinstance(value, str) else value or []:
            problems += _checked(key, _source_problems, key, spec)
    return problems


def _source_problems(key: str, spec: str) -> list[str]:
    if spec.startswith(HF_PREFIX):  # a hub dataset: the network would tell
        return []
    try:
        sources = expand_source(spec)
    except DataError as exc:  # a glob that matches nothing
        return [f"{key}: {exc}"]
    return [f"{key}: {source}: no such file" for source in sources if not Path(source).exists()]


def _model_problems(cfg: RunConfig) -> list[str]:
    problems = []
    model = cfg.model.name_or_path
    if model is not None:
        problems += _checked("model.name_or_path", _model_dir_problems, model)
    tokenizer = cfg.tokenizer.name_or_path
    if tokenizer is not None:
        problems += _checked("tokenizer.name_or_path", _tokenizer_dir_problems, tokenizer)
    return problems


def _model_dir_problems(name_or_path: str) -> list[str]:
    """`kiln.models.build`'s rule: a local path must be a directory; the directory is read
    by transformers' AutoConfig, which needs its config.json."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return []
        reason = "no config.json in the directory (not a transformers model)"
    elif looks_local(name_or_path):
        reason = "no such directory"
    else:  # a hub id
        return []
    return [f"model.name_or_path: cannot load {name_or_path!r}: {reason}"]


def _tokenizer_dir_problems(name_or_path: str) -> list[str]:
    """`kiln.models.tokenizer.load_tokenizer`'s rule: a local path must be a directory."""
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        return [
            f"tokenizer.name_or_path: cannot load tokenizer {name_or_path!r}: no such directory"
        ]
    return []


def _extra_problems(cfg: RunConfig) -> list[str]:
    """The optional packages the config needs, as the code that imports them names them:
    `kiln.models.lora.import_peft`, the trackers' `missing` (`kiln.callbacks.loggers.base`),
    the text metrics' scorers (`kiln.metrics.text`: sacrebleu, rouge-score)."""
    needs = []
    if cfg.lora.enabled:
        needs.append(("peft", "lora", "lora.enabled: LoRA"))
    needs += [(name, name, f"log.loggers: {name}") for name in cfg.log.loggers]
    if cfg.eval.generate.num_samples > 0:  # generation eval scores with `kiln.metrics.text`
        scorers = {"bleu": "sacrebleu", "rouge": "rouge_score"}
        needs += [
            (scorers[m], "metrics", f"eval.generate.metrics: {m}")
            for m in cfg.eval.generate.metrics
            if m in scorers
        ]
    problems = [line for m, e, f in needs if (line := missing_extra(m, e, feature=f))]
    if cfg.export.on_finish and "onnx" in cfg.export.formats:
        feature = "export.on_finish: ONNX export"
        missing = (missing_extra(m, "export", feature=feature) for m in ONNX_MODULES)
        problems += [line for line in missing if line][:1]  # one install fixes them all
    return problems


def _run_problems(
    cfg: RunConfig, overwrite: bool, resume: str | Path | bool | None, run_dir: bool
) -> list[str]:
    """The engine's order (`Trainer` then `resume_target`): claim the directory, find the
    checkpoint to resume, then refuse a run already there unless it is replaced or continued.
    Checkpoints are judged by manifest and file sizes: the run verifies checksums."""
    root = resolve_path(cfg.run_dir, "output_dir")
    if run_dir:
        refused = not_a_directory(root)
        if refused:
            return [refused]
    want = resume if resume is not None else ("auto" if cfg.checkpoint.resume == "auto" else False)
    checkpoints = CheckpointManager(RunPaths(root).checkpoints)
    _, _, must_be_free = resume_plan(want, checkpoints, root, checksums=False)
    if not run_dir or must_be_free is None or overwrite:
        return []
    _, held = held_run(root)
    return [held_run_refusal(root, held, must_be_free)] if held else []
