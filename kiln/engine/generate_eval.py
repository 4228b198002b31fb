"""Generation-based evaluation: generate from validation prompts, score with named metrics.

Which text is the prompt and which the reference, per task:

- causal_lm: the row's text is split after the first occurrence of
  `eval.generate.prompt_split` (default a newline, so "Title: Lemon Rice\\n" is the prompt of a
  recipe and the rest of the recipe is the reference); rows without the marker are skipped.
- instruction: the rendered prompt and response (`kiln.data.tasks.make_format`).
- chat: the conversation before its last assistant turn, rendered with the chat template and
  its generation prompt, and that turn's content; decoding stops at the template's end of turn.
- seq2seq: the rendered source and target.

The same first `num_samples` usable validation rows are used at every evaluation, so the
numbers are comparable across steps. A time budget (`eval.generate.max_time_s`) skips whole
samples and never cuts one (`generate_samples`): the scores cover the complete samples only,
`val_gen_samples_scored` of `val_gen_samples` says how many, and a warning names the budget. A
run whose samples all complete has the same scores on a fast and on a slow machine.
Generation is `kiln.models.generation.generate_samples` (`generate_texts`), the function
behind `kiln generate` and the end-of-run sample too (the same prompt encoding, padding, EOS
and context rules): greedy unless `do_sample`, seeded with the run's seed, and
never changing the training RNG stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.data.tasks import make_format
from kiln.errors import KilnError
from kiln.files import write_atomic
from kiln.metrics.registry import GenSample, Metric, get_metric
from kiln.models.generation import GenerationOptions, generate_samples, run_sample

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.engine.parts import Parts
    from kiln.rank import RankContext

__all__ = ["GenerationEval", "end_sample", "eval_pairs"]

log = logging.getLogger("kiln")


def eval_pairs(cfg: RunConfig, rows: Sequence[Mapping[str, Any]], n: int) -> list[tuple[str, str]]:
    """(prompt, reference) of the first `n` rows that have both (see the module docstring)."""
    fmt = make_format(cfg)
    marker = cfg.eval.generate.prompt_split
    pairs: list[tuple[str, str]] = []
    for i, row in enumerate(rows):
        if len(pairs) >= n:
            break
        parts = fmt.render(row, i)
        if cfg.task == "causal_lm":
            text = parts[0]
            cut = text.find(marker) if marker else -1
            if cut < 0:
                continue
            prompt, reference = text[: cut + len(marker)], text[cut + len(marker) :]
        elif cfg.task == "chat":  # the conversation before its last reply, and that reply
            messages = json.loads(parts[0])
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt, reference = json.dumps(messages[:last]), messages[last]["content"]
            if last == 0:
                continue
        else:
            prompt, reference = parts[0], parts[1]
        if prompt and reference.strip():
            pairs.append((prompt, reference))
    return pairs


class GenerationEval:
    """Generation eval as `eval.generate` configures it; the trainer and `kiln eval` run it.

    Metric names are resolved when it is built, so an unknown name fails before training.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.gen = cfg.eval.generate
        self.metrics: dict[str, Metric] = {}
        for i, name in enumerate(self.gen.metrics):
            try:
                self.metrics[name] = get_metric(name)
            except KeyError as exc:
                raise KilnError(f"eval.generate.metrics[{i}]: {exc.args[0]}") from None
        self._pairs: list[tuple[str, str]] | None = None
        self._rows_id: int | None = None
        self._warned_no_rows = False

    def due(self, step: int, *, last: bool) -> bool:
        """Whether a validation at `step` includes generation (`every_steps`, and the last)."""
        every = self.gen.every_steps
        return self.gen.num_samples > 0 and (every is None or step % every == 0 or last)

    def due_for(self, rows: Sequence[Mapping[str, Any]] | None, step: int, *, last: bool) -> bool:
        """`due`, with rows to generate for: validation data given as tokens has none (then
        skipped, with one warning)."""
        if rows is None:
            if not self._warned_no_rows:
                log.warning("eval.generate: skipped, the validation data was given as tokens")
                self._warned_no_rows = True
            return False
        return self.due(step, last=last)

    def pairs(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
        """The (prompt, reference) pairs of `rows` (computed once per row list)."""
        if self._pairs is None or self._rows_id != id(rows):
            self._pairs = eval_pairs(self.cfg, rows, self.gen.num_samples)
            self._rows_id = id(rows)
            if not self._pairs:
                log.warning(
                    "generation eval: no validation row has a prompt and a reference "
                    "(eval.generate.prompt_split=%r); skipped",
                    self.gen.prompt_split,
                )
        return self._pairs

    def run(
        self,
        model: Any,
        tokenizer: Any,
        rows: Sequence[Mapping[str, Any]],
        *,
        samples_file: Path | None = None,
        should_stop: Callable[[], bool] | None = None,
        synced: Any = None,
    ) -> dict[str, float] | None:
        """Generate for the eval rows and score them; None when `should_stop` cut it short.

        Returns `val_<score>` for every score of every metric over the complete samples, plus
        `val_gen_samples` (the samples asked for), `val_gen_samples_scored` (those complete
        within the time budget, which the scores cover) and `val_gen_time_s`. Writes the scored
        samples to `samples_file` (JSONL: prompt, reference, generation) when given.
        `synced`: the ranks of a sharded model, which all run this call (see
        `generate_texts`).
        """
        pairs = self.pairs(rows)
        if not pairs:
            return {}
        start = time.perf_counter()
        stops: tuple[int, ...] = ()
        if self.cfg.task == "chat":  # the conversation so far, through the chat template
            from kiln.data.chat import chat_stop_ids, conversation_prompt

            pairs = [(conversation_prompt(tokenizer, json.loads(p)), r) for p, r in pairs]
            stops = chat_stop_ids(tokenizer)
        options = GenerationOptions(
            max_new_tokens=self.gen.max_new_tokens,
            do_sample=self.gen.do_sample,
            temperature=self.gen.temperature,
            top_p=self.gen.top_p,
            seed=self.cfg.seed,
            stop_ids=stops,
        )
        texts = generate_samples(
            model,
            tokenizer,
            [p for p, _ in pairs],
            options=options,
            batch_size=self.gen.batch_size,
            max_time_s=self.gen.max_time_s,
            should_stop=should_stop,
            synced=synced,
        )
        if should_stop is not None and should_stop():
            return None
        # None: a sample the time budget left out (skipped whole, never cut short).
        samples = [
            GenSample(prompt, reference, text, self.cfg.task)
            for (prompt, reference), text in zip(pairs, texts, strict=True)
            if text is not None
        ]
        if len(samples) < len(pairs):
            log.warning(
                "generation eval: %d of %d samples scored (time budget eval.generate.max_time_s="
                "%s ran out; the others were skipped whole, none cut short)",
                len(samples),
                len(pairs),
                self.gen.max_time_s,
            )
        metrics: dict[str, float] = {}
        if samples:
            for metric in self.metrics.values():
                metrics.update({f"val_{k}": float(v) for k, v in metric(samples).items()})
        metrics["val_gen_samples"] = float(len(pairs))
        metrics["val_gen_samples_scored"] = float(len(samples))
        metrics["val_gen_time_s"] = time.perf_counter() - start
        if samples_file is not None and self.gen.write_samples:
            samples_file.parent.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps(s.to_dict(), ensure_ascii=False) + "\n" for s in samples]
            write_atomic(samples_file, "".join(lines))
        return metrics


def end_sample(cfg: RunConfig, parts: Parts, rank: RankContext) -> str | None:
    """The end-of-run sample (`eval.sample_prompt`) on the main rank (None on the others, and
    without a prompt). The main rank generates it alone; under FSDP every rank takes part."""
    prompt, synced = cfg.eval.sample_prompt, parts.parallel.synced
    if prompt is None or not (rank.is_main or synced):
        return None
    max_new, model = cfg.eval.sample_max_new_tokens, parts.model
    chat = cfg.task == "chat"  # the prompt is a user message, through the chat template
    text = run_sample(model, parts.tokenizer, prompt, max_new, cfg.seed, synced=synced, chat=chat)
    return text if rank.is_main else None
