"""task: chat: conversations rendered with the chat template, the loss on the assistant turns.

The label masks are checked token by token against the rendered template for two template
families (chatml, Llama 3) on both of kiln's paths (a template's own `{% generation %}`
markers, and per-turn prefix rendering), against transformers' `return_assistant_tokens_mask`,
and the loss against TRL's SFTTrainer with `assistant_only_loss`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kiln import Trainer, load_config
from kiln.config import ConfigError
from kiln.data.chat import CHAT_TEMPLATES, ChatFormat, set_chat_template, tokenize_chat
from kiln.data.collate import IGNORE_INDEX
from kiln.errors import DataError
from tests.helpers import ROOT, bpe_tokenizer, reference_args, saved_gpt2, write_jsonl

SYSTEM = {"role": "system", "content": "You write recipes."}


def conversation(i: int, turns: int = 2) -> list[dict[str, str]]:
    """A conversation of `turns` user/assistant exchanges (with a system message)."""
    messages = [SYSTEM]
    for t in range(turns):
        messages.append({"role": "user", "content": f"Recipe {i} part {t}, please?"})
        messages.append({"role": "assistant", "content": f"Chop {i} onions, then stir {t} times."})
    return messages


# chatml with the markers TRL's training templates carry: the turn and its <|im_end|>.
CHATML_TAGGED = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [m["content"] for i in range(40) for m in conversation(i)]


def chat_tokenizer(corpus: list[str], template: str) -> Any:
    """A tiny BPE with `template` (a built-in name or Jinja) and the chatml markers."""
    tokenizer = bpe_tokenizer(corpus, vocab_size=400)
    if template == CHATML_TAGGED:
        set_chat_template(tokenizer, "chatml")  # the markers
    set_chat_template(tokenizer, template)
    return tokenizer


def trained(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of target tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize(
    ("template", "end"),
    [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), (CHATML_TAGGED, "<|im_end|>")],
    ids=["chatml", "llama3", "chatml-generation-markers"],
)
def test_the_label_mask_is_each_assistant_turn_and_its_end_marker(corpus, template, end) -> None:
    tokenizer = chat_tokenizer(corpus, template)
    messages = conversation(3, turns=3)
    rendered = ChatFormat().render({"messages": messages}, 0)
    example = tokenize_chat(rendered, tokenizer, 4096)[0]
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    # The input is the template's rendering, tokenized whole.
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    # Token by token: the targets are exactly each assistant turn's content and end marker.
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert trained(tokenizer, ids, labels) == [a + end for a in answers]
    # Everything else (system, user turns, the role headers) is masked.
    masked = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    assert tokenizer.decode(masked).count("Recipe 3 part") == 3
    if template == CHATML_TAGGED:  # the same mask as transformers gives from the markers
        reference = tokenizer.apply_chat_template(
            messages, return_dict=True, return_assistant_tokens_mask=True
        )
        assert reference["input_ids"] == ids
        assert [int(label != IGNORE_INDEX) for label in labels] == reference["assistant_masks"]


def test_both_paths_give_the_same_mask(corpus) -> None:
    """Prefix rendering (no markers) finds the turns the markers name."""
    plain, tagged = chat_tokenizer(corpus, "chatml"), chat_tokenizer(corpus, CHATML_TAGGED)
    rendered = [ChatFormat().render({"messages": conversation(i, 1 + i % 3)}, i) for i in range(6)]
    a = tokenize_chat([r[0] for r in rendered], plain, 4096)
    b = tokenize_chat([r[0] for r in rendered], tagged, 4096)
    for i in range(6):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
        assert torch.equal(a[i]["labels"], b[i]["labels"])


def test_chat_loss_last_and_all(corpus) -> None:
    tokenizer = chat_tokenizer(corpus, "chatml")
    rendered = ChatFormat().render({"messages": conversation(5, turns=2)}, 0)[0]
    every = tokenize_chat([rendered], tokenizer, 4096, "assistant")[0]
    last = tokenize_chat([rendered], tokenizer, 4096, "last")[0]
    whole = tokenize_chat([rendered], tokenizer, 4096, "all")[0]
    ids = every["input_ids"].tolist()
    runs = trained(tokenizer, ids, every["labels"].tolist())
    assert trained(tokenizer, ids, last["labels"].tolist()) == runs[-1:]
    assert torch.equal(whole["labels"], whole["input_ids"])


def test_truncation_keeps_whole_turns_and_never_cuts_a_prompt(corpus) -> None:
    tokenizer = chat_tokenizer(corpus, "chatml")
    messages = conversation(7, turns=3)
    rendered = ChatFormat().render({"messages": messages}, 0)[0]
    full = tokenize_chat([rendered], tokenizer, 4096)[0]["input_ids"].tolist()
    two_turns = tokenizer.apply_chat_template(messages[:5], tokenize=False).rstrip()
    n_two = len(tokenizer(two_turns, add_special_tokens=False)["input_ids"])
    # Room for two turns and part of the third: cut after the second turn's end marker.
    cut = tokenize_chat([rendered], tokenizer, n_two + 3)[0]
    assert cut["input_ids"].tolist() == full[:n_two]
    runs = trained(tokenizer, full[:n_two], cut["labels"].tolist())
    assert runs == [m["content"] + "<|im_end|>" for m in messages[2:5:2]]
    # Room for the first prompt and a few answer tokens: the answer is cut, the prompt whole.
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    short = tokenize_chat([rendered], tokenizer, n_prompt + 2)[0]
    assert short["input_ids"].tolist() == full[: n_prompt + 2]
    assert short["labels"].tolist()[n_prompt:] == full[n_prompt : n_prompt + 2]
    assert set(short["labels"].tolist()[:n_prompt]) == {IGNORE_INDEX}
    # No room after the first prompt: dropped, with the others kept and mapped to their rows.
    other = ChatFormat().render({"messages": [messages[1], messages[2]]}, 1)[0]
    kept = tokenize_chat([rendered, other], tokenizer, n_prompt, quiet=True)
    assert len(kept) == 1
    assert kept.source_rows.tolist() == [1]
    with pytest.raises(DataError, match=r"conversation 0: \d+ tokens exceed data.max_length=20"):
        tokenize_chat([rendered], tokenizer, 20, truncation=False)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "hi"}, "missing field 'messages'"),
        ({"messages": []}, "empty conversation"),
        ({"messages": [{"role": "chef", "content": "x"}]}, r"messages\[0\].role: unknown role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content must be a string"),
        ({"messages": "hello"}, "must be a list of messages"),
    ],
)
def test_bad_conversations_are_named(row: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        ChatFormat().render(row, 4)


def _write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def chat_raw(tmp_path: Path, train: Path, **data: Any) -> dict[str, Any]:
    return {
        "name": "chat",
        "output_dir": str(tmp_path / "run"),
        "task": "chat",
        "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "tokenizer": {"vocab_size": 320, "chat_template": "chatml"},
        "data": {"train": str(train), "val_split": 0, "cache_dir": None, **data},
        "train": {"max_steps": 4, "batch_size": 4},
        "log": {"every_steps": 2, "progress": "none", "plots": False},
    }


def test_kiln_train_refuses_bad_conversations_in_one_line_each(tmp_path: Path) -> None:
    rows = [{"messages": conversation(i)} for i in range(8)]
    rows[2] = {"messages": [{"role": "user", "content": "x"}]}
    rows[5] = {"messages": [{"role": "wizard", "content": "x"}, *conversation(5)]}
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = _write_yaml(tmp_path / "c.yaml", chat_raw(tmp_path, train))
    done = subprocess.run(
        [sys.executable, "-m", "kiln", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "chat.jsonl:" in line]
    assert len(lines) == 2, done.stderr
    assert "chat.jsonl:3: the conversation has no assistant turn" in lines[0]
    assert "chat.jsonl:6: messages[0].role: unknown role 'wizard'" in lines[1]
    # data.on_bad_row: skip counts them and goes on.
    from kiln.data import load_splits

    raw = chat_raw(tmp_path, train, on_bad_row="skip")
    rows, _, stats = load_splits(load_config(data=raw))
    assert (len(rows), stats.bad_rows) == (6, 2)


def test_a_template_that_does_not_render_is_named(tmp_path: Path, corpus) -> None:
    tokenizer = chat_tokenizer(corpus, "{{ raise_exception('no tools here') }}")
    rendered = [ChatFormat().render({"messages": conversation(0)}, 0)[0]]
    with pytest.raises(DataError, match=r"chat\.jsonl:9: the chat template does not render it"):
        tokenize_chat(rendered, tokenizer, 512, locations=["chat.jsonl:9"])


def test_a_tokenizer_trained_for_chat_needs_a_template(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(0)}])
    raw = chat_raw(tmp_path, train)
    raw["tokenizer"].pop("chat_template")
    with pytest.raises(ConfigError, match=r"tokenizer\.chat_template: task chat with a tokenizer"):
        load_config(data=raw)


def test_a_chat_run_trains_and_saves_its_template(tmp_path: Path) -> None:
    rows = [{"messages": conversation(i, 1 + i % 2)} for i in range(24)]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    raw = chat_raw(tmp_path, train)
    raw["eval"] = {"sample_prompt": "Recipe 3 part 0, please?", "sample_max_new_tokens": 8}
    result = Trainer(load_config(data=raw)).fit()
    assert len(result.loss_history) == 4
    # The end-of-run sample is a reply to the prompt as a user message, through the template.
    assert result.sample.startswith("<|im_start|>user\nRecipe 3 part 0, please?<|im_end|>\n")
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(result.final_dir)
    assert saved.chat_template == CHAT_TEMPLATES["chatml"][0]
    assert "<|im_end|>" in saved.get_vocab()


# ---- parity with TRL's SFTTrainer (assistant_only_loss) ---------------------------------------


@pytest.mark.slow
def test_chat_sft_equals_trl_sft_trainer(tmp_path: Path, corpus) -> None:
    """The same tiny GPT-2, conversations, lr and full batch (8 conversations, so the order a
    sampler draws them in does not matter): kiln's loss per step equals TRL's SFTTrainer with
    assistant_only_loss to 1e-5 relative over 10 steps, and the final weights to 1e-4."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    tokenizer = chat_tokenizer(corpus, CHATML_TAGGED)
    model_dir, tok_dir = saved_gpt2(tmp_path, tokenizer, positions=256)
    rows = [{"messages": conversation(i, 1 + i % 3)} for i in range(8)]
    steps, lr = 10, 1e-3

    trl_args = SFTConfig(
        **reference_args(tmp_path / "trl", batch=8, steps=steps, lr=lr),
        assistant_only_loss=True,
        packing=False,
        padding_free=False,
        max_length=None,
    )
    trl_model = GPT2LMHeadModel.from_pretrained(model_dir)
    sft = SFTTrainer(
        model=trl_model,
        args=trl_args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    sft.train()
    trl_losses = [h["loss"] for h in sft.state.log_history if "loss" in h]

    raw = chat_raw(tmp_path, write_jsonl(tmp_path / "chat.jsonl", rows))
    raw["model"] = {"name_or_path": str(model_dir)}
    raw["tokenizer"] = {"name_or_path": str(tok_dir)}
    raw["optim"] = {
        "lr": lr,
        "scheduler": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
    }
    raw["train"] = {"max_steps": steps, "batch_size": 8, "grad_clip": 1.0, "precision": "fp32"}
    raw["log"] = {"every_steps": 1, "progress": "none", "plots": False}
    raw["data"].update(dedup=False, packing=False)  # TRL: packing=False
    trainer = Trainer(load_config(data=raw))
    result = trainer.fit()

    assert len(trl_losses) == steps
    assert result.loss_history == pytest.approx(trl_losses, rel=1e-5)
    ours = dict(trainer.model.named_parameters())
    for name, theirs in sft.model.named_parameters():
        assert torch.allclose(ours[name], theirs, atol=1e-4, rtol=0), name


@pytest.mark.parametrize(("template", "end"), [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_a_reply_stops_at_the_templates_end_of_turn(corpus, template, end) -> None:
    from kiln.data.chat import chat_prompt, chat_stop_ids

    tokenizer = chat_tokenizer(corpus, template)
    assert chat_stop_ids(tokenizer) == (tokenizer.convert_tokens_to_ids(end),)
    prompt = chat_prompt(tokenizer, "Recipe 1 part 0, please?", system=SYSTEM["content"])
    whole = tokenizer.apply_chat_template(
        [SYSTEM, {"role": "user", "content": "Recipe 1 part 0, please?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == whole
    assert chat_stop_ids(bpe_tokenizer(corpus, vocab_size=300)) == ()  # no template: EOS only


def test_kiln_generate_chat_renders_the_prompt_and_stops_at_the_turn_end(tmp_path: Path) -> None:
    """The decoding kiln generate --chat asks for: the rendered prompt, EOS and <|im_end|> as
    stops (recorded from the model's generate call), and the reply alone printed."""
    from kiln.cli import main
    from kiln.data.chat import chat_prompt
    from kiln.models.load import load_trained

    rows = [{"messages": conversation(i, 1)} for i in range(24)]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = Trainer(load_config(data=chat_raw(tmp_path, train))).fit()
    loaded = load_trained(result.final_dir)
    calls: list[dict[str, Any]] = []
    original = type(loaded.model).generate

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(loaded.model), "generate", spy)
        code = main(["-q", "generate", str(result.run_dir), "Recipe 1 part 0, please?", "--chat"])
    assert code == 0
    tok = loaded.tokenizer
    stops = calls[0]["eos_token_id"]
    assert stops == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    prompt = tok.decode(calls[0]["input_ids"][0][calls[0]["attention_mask"][0].bool()])
    assert prompt == chat_prompt(tok, "Recipe 1 part 0, please?")
    assert main(["-q", "generate", str(result.run_dir), "x", "--system", "s"]) == 2


def test_packed_conversations_are_whole_isolated_and_lose_nothing(corpus) -> None:
    """Whole conversations in blocks: each keeps its positions, none attends to another (the
    logits of one do not move when another changes), and the summed loss of a packed batch is
    the sum of the conversations' own."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kiln.data.chat import PackedConversations
    from kiln.engine.loss import forward_loss_sum

    tokenizer = chat_tokenizer(corpus, "chatml")
    rendered = [
        ChatFormat().render({"messages": conversation(i, 1 + i % 3)}, i)[0] for i in range(9)
    ]
    alone = tokenize_chat(rendered, tokenizer, 4096)
    sizes = alone.lengths.tolist()
    packed = PackedConversations(alone, 2 * max(sizes), tokenizer.pad_token_id)
    assert len(packed) < len(alone)  # several to a block
    assert sorted(c for b in packed.bins for c in b) == list(range(9))  # each exactly once
    assert all(sum(sizes[c] for c in b) <= packed.length for b in packed.bins)
    batch = packed.batch(torch.arange(len(packed)))
    assert "attention_mask" not in batch
    assert int(batch["real_tokens"].sum()) == sum(sizes)  # throughput counts no padding
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=2)
    ).eval()
    with torch.no_grad():
        packed_sum = forward_loss_sum(model, batch, "chat")[0]
        sums = [
            forward_loss_sum(model, {k: v[None] for k, v in alone[i].items()}, "chat")[0]
            for i in range(9)
        ]
    assert float(packed_sum) == pytest.approx(float(sum(sums)), rel=1e-5)
    # Change the first conversation of a two-conversation block: the second one's logits stay.
    b = next(i for i, members in enumerate(packed.bins) if len(members) >= 2)
    one = packed.batch(torch.tensor([b]))
    one.pop("labels")
    one.pop("real_tokens")
    start = sizes[packed.bins[b][0]]
    assert one["position_ids"][0, start] == 0  # the second conversation restarts at 0
    other = {k: v.clone() for k, v in one.items()}
    other["input_ids"][0, 1:start] = tokenizer.pad_token_id
    with torch.no_grad():  # (use_cache=False, as training runs: with a cache, no isolation)
        a = model(**one, use_cache=False).logits
        c = model(**other, use_cache=False).logits
    end = start + sizes[packed.bins[b][1]]
    assert torch.allclose(a[0, start:end], c[0, start:end], atol=1e-5)
    assert not torch.allclose(a[0, 1:start], c[0, 1:start], atol=1e-3)


def test_generation_eval_replies_to_the_conversation_before_its_last_turn(tmp_path: Path) -> None:
    rows = [{"messages": conversation(i, 1 + i % 2)} for i in range(24)]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"messages": conversation(i, 2)} for i in (50, 51)])
    raw = chat_raw(tmp_path, train, val=str(val))
    generate = {"num_samples": 2, "batch_size": 2, "max_new_tokens": 6, "metrics": ["bleu"]}
    raw["eval"] = {"every_steps": 4, "generate": generate}
    result = Trainer(load_config(data=raw)).fit()
    assert "val_bleu" in result.metrics[-1]
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples" / "step-4.jsonl").open()]
    assert len(samples) == 2
    last_user = "<|im_start|>user\nRecipe 50 part 1, please?<|im_end|>\n"
    assert samples[0]["prompt"].endswith(last_user + "<|im_start|>assistant\n")
    assert samples[0]["reference"] == "Chop 50 onions, then stir 1 times."


def test_conversations_given_in_python_train_as_files_do(tmp_path: Path) -> None:
    rows = [{"messages": conversation(i, 1 + i % 2)} for i in range(24)]
    raw = chat_raw(tmp_path, tmp_path / "unused.jsonl")
    raw["data"].pop("train")
    given = Trainer(load_config(data=raw, complete=False), train_data=rows).fit()
    raw["output_dir"] = str(tmp_path / "from-file")
    raw["data"]["train"] = str(write_jsonl(tmp_path / "chat.jsonl", rows))
    from_file = Trainer(load_config(data=raw)).fit()
    assert given.loss_history == from_file.loss_history
