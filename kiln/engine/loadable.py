"""What makes `checkpoints/step-N/` open with transformers and PEFT, besides resuming.

A checkpoint already keeps its weights in `model.safetensors` (`trainable_state_dict`: the
model's own parameter names, tied weights once), the file `from_pretrained` looks for; they
are not written twice. Next to them go, before the manifest seals the checkpoint:

- a full model: `config.json` (and `generation_config.json`) and the tokenizer's files, so
  `AutoModelForCausalLM.from_pretrained("step-N")` (or Seq2SeqLM) and
  `AutoTokenizer.from_pretrained("step-N")` load it;
- LoRA: `adapter_config.json` and `adapter_model.safetensors` (the adapters under PEFT's names:
  a copy of model.safetensors, which holds only the adapters and `modules_to_save`, so small)
  and the tokenizer, so `PeftModel.from_pretrained(base, "step-N")` loads it. No config.json:
  `AutoModel*.from_pretrained` would build a base of random weights from it;
- under FSDP (sharded weights in `dcp/`): nothing; the weights are torch.distributed.checkpoint
  shards, which `kiln eval`, `kiln generate` and `kiln export` read (final/ is gathered).

They are listed in the manifest like every other file: verified, rotated and renamed into
place with the rest. Resume reads none of them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.files import writing
from kiln.runs import checkpoint_name

if TYPE_CHECKING:
    from kiln.checkpoint import CheckpointManager
    from kiln.engine.parts import Parts
    from kiln.rank import RankContext

__all__ = ["write_loadable"]


def write_loadable(
    checkpoints: CheckpointManager,
    parts: Parts,
    rank: RankContext,
    step: int,
    staging: Path | None,
) -> Path | None:
    """Write the files transformers and PEFT need into the staging directory of `step`'s
    checkpoint (made here when `staging` is None) on the main rank; returns the staging
    directory to complete with `CheckpointManager.save(..., staging=...)` (as given where
    there is nothing to write)."""
    model, tokenizer = parts.model, parts.tokenizer
    if not (rank.is_main and checkpoints.enabled and parts.parallel.main_writes_weights):
        return staging
    made = staging is None
    staging = checkpoints.stage(step) if staging is None else staging
    from kiln.models.quiet import no_hf_progress

    try:
        with writing(f"checkpoint {checkpoints.root / checkpoint_name(step)}"), no_hf_progress():
            if hasattr(model, "peft_config"):
                _write_adapter(model, staging)
            else:
                _write_config(model, staging)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(staging)
    except BaseException:
        if made:  # else its owner (the FSDP save) removes it
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _write_config(model: Any, where: Path) -> None:
    """config.json as `save_pretrained` writes it (architectures set), and the generation
    config; nothing for a model that is not a transformers one."""
    config = getattr(model, "config", None)
    if not hasattr(config, "save_pretrained"):
        return
    config = copy.deepcopy(config)  # the live config is not the checkpoint's to change
    config.architectures = [type(model).__name__]
    config.save_pretrained(where)
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if generation is not None and can_generate():
        generation.save_pretrained(where)


def _write_adapter(model: Any, where: Path) -> None:
    """adapter_config.json and adapter_model.safetensors of the active adapter, as
    `PeftModel.save_pretrained` writes them."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    name = model.active_adapter
    model.peft_config[name].save_pretrained(where)
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(where / "adapter_model.safetensors"), metadata={"format": "pt"})
