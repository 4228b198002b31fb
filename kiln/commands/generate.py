"""`kiln generate RUN_DIR|CKPT PROMPT`: decode from a trained model (greedy, sampling, beams);
`--backend onnx|torchscript|pt2 EXPORT_DIR`: greedy decoding in an exported model.

Generation is `kiln.models.generation.generate_texts` (its docstring has the rules: no special
tokens added to the prompt, a decoder-only prompt cut from the left to fit the context).
"""

from __future__ import annotations

import argparse

from kiln.commands import MODEL_PATH, add_flag, add_path
from kiln.runs import ExitCode

HELP = "generate text from a run's final model or a checkpoint"
QUIET_HF = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_path(p, "path", "RUN_DIR|CKPT", f"{MODEL_PATH}, or a model directory")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt (seq2seq: the source text)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (100)")
    add_flag(p, "--sample", "sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (1: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling RNG (0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto)")
    add_flag(
        p,
        "--chat",
        "the prompt is a user message: rendered with the model's chat template, the reply "
        "printed alone, decoding stopped at the end of the assistant's turn",
    )
    p.add_argument("--system", metavar="TEXT", help="--chat: a system message before the prompt")
    p.add_argument(
        "--backend",
        choices=("torch", "onnx", "torchscript", "pt2"),
        default="torch",
        help="torch (the model), or an exported model in a `kiln export` directory: "
        "greedy, recomputing the whole sequence each token (torch)",
    )


def run(args: argparse.Namespace) -> int:
    from kiln.device import resolve_device
    from kiln.errors import KilnError
    from kiln.models.generation import GenerationOptions, generate_texts
    from kiln.models.load import load_trained

    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.num_beams,
        seed=args.seed,
    )
    options.check(flags=True)  # before loading a model for minutes
    if args.system is not None and not args.chat:
        raise KilnError("--system: a system message needs --chat")
    if args.backend != "torch":
        if args.chat:
            raise KilnError(f"--chat: not with --backend {args.backend} (greedy text only)")
        return _exported(args, options)
    device = resolve_device(args.device)
    loaded = load_trained(args.path, device=device)
    if args.chat:
        from dataclasses import replace

        from kiln.data.chat import chat_prompt, chat_stop_ids

        if getattr(loaded.tokenizer, "chat_template", None) is None:
            raise KilnError(f"--chat: {args.path}: the tokenizer has no chat template")
        prompt = chat_prompt(loaded.tokenizer, args.prompt, system=args.system)
        options = replace(options, stop_ids=chat_stop_ids(loaded.tokenizer))
        [reply] = generate_texts(loaded.model, loaded.tokenizer, [prompt], options=options)
        print(reply.strip())
        return ExitCode.FINISHED
    [text] = generate_texts(loaded.model, loaded.tokenizer, [args.prompt], options=options)
    print(text if loaded.task == "seq2seq" else args.prompt + text)
    return ExitCode.FINISHED


def _exported(args: argparse.Namespace, options: object) -> int:
    """Greedy decoding in an exported model (`kiln export`'s directory) with its tokenizer."""
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    from kiln.errors import KilnError
    from kiln.export import load_runner
    from kiln.export.parity import greedy_texts

    if args.sample or args.num_beams != 1:
        raise KilnError(
            f"--backend {args.backend}: greedy decoding only (no --sample, --num-beams)"
        )
    where = Path(args.path)
    if not (where / "kiln_export.json").is_file():
        raise KilnError(f"{where}: not a kiln export directory (no kiln_export.json)")
    run = load_runner(args.backend, where)
    tokenizer = AutoTokenizer.from_pretrained(str(where))
    config = AutoConfig.from_pretrained(str(where))
    [text] = greedy_texts(run, tokenizer, config, [args.prompt], args.max_new_tokens)
    print(text if config.is_encoder_decoder else args.prompt + text)
    return ExitCode.FINISHED
