"""`gemmalab` command line: one subcommand per stage; each parses its flags and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemmalab.errors import GemmalabError


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory, .gguf file, .ckpt file or registered name (gemma3-270m)")
    p.add_argument("--preset", help="model preset for a gemma_pytorch .ckpt, which carries no config (e.g. gemma-2b)")


def _add_sampling(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    _add_runtime(p)


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="weight-only quantization (int8: near-lossless; int4: faster, perplexity about 1.4-2x)")


def _load(args):
    import gemmalab
    from gemmalab.model import get_preset

    config = get_preset(args.preset) if getattr(args, "preset", None) else None
    model, tokenizer = gemmalab.load(args.model, dtype=getattr(args, "dtype", "float32"),
                                     device=getattr(args, "device", "cpu"), config=config)
    if getattr(args, "quantize", None):
        from gemmalab.model.quant import quantize

        quantize(model, args.quantize)
    return model, tokenizer


def _require_tokenizer(tokenizer, ref):
    if tokenizer is None:
        raise GemmalabError(f"Model {ref} has no tokenizer (tokenizer.model); add one to the model directory.")
    return tokenizer


def cmd_generate(args) -> None:
    from gemmalab.inference import generate

    _set_threads(args)
    model, tokenizer = _load(args)
    tokenizer = _require_tokenizer(tokenizer, args.model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    out = generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)[0]
    if args.json:
        print(json.dumps({"prompt_ids": out.prompt_ids, "ids": out.ids, "text": out.text}, ensure_ascii=False))
    else:
        print((args.prompt if not args.chat else "") + out.text)


def cmd_chat(args) -> None:
    from gemmalab.inference import Engine, SamplingParams
    from gemmalab.inference.chat import run_chat

    _set_threads(args)
    model, tokenizer = _load(args)
    engine = Engine(model, _require_tokenizer(tokenizer, args.model), max_batch_size=1)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    run_chat(engine, params, args.system, str(args.model))


def cmd_serve(args) -> None:
    from gemmalab.inference import Engine
    from gemmalab.inference.server import serve

    _set_threads(args)
    model, tokenizer = _load(args)
    engine = Engine(model, _require_tokenizer(tokenizer, args.model), max_batch_size=args.max_batch_size,
                    compile=args.compile)
    serve(engine, args.model_name or str(args.model), host=args.host, port=args.port, max_queue=args.max_queue,
          batch_wait_ms=args.batch_wait_ms)


def _set_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def _tokenize_inputs(args):
    """(line number, text) pairs from --text or a JSONL file of {"text": ...} objects."""
    from gemmalab.jsonl import read_jsonl

    if args.text is not None:
        yield 1, args.text
        return
    for n, obj in read_jsonl(args.input):
        if not isinstance(obj.get("text"), str):
            raise GemmalabError(f'{args.input}, line {n}: expected an object with a string field "text".')
        yield n, obj["text"]


def cmd_tokenize(args) -> None:
    from gemmalab.checkpoint import load_tokenizer

    tokenizer = _require_tokenizer(load_tokenizer(args.model), args.model)
    for _, text in _tokenize_inputs(args):
        ids = tokenizer.encode(text, bos=not args.no_bos)
        if args.json:
            print(json.dumps({"ids": ids}))
        else:
            print(" ".join(map(str, ids)))


def cmd_convert(args) -> None:
    from gemmalab.checkpoint import save_hf
    from gemmalab.tokenizer import Tokenizer

    if args.to != "hf":
        raise GemmalabError(f"--to {args.to}: only the Hugging Face layout (hf) can be written.")
    model, tokenizer = _load(args)
    if args.tokenizer:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    out = save_hf(model, args.dst, tokenizer)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n:,} parameters, {args.dtype}{', with tokenizer' if tokenizer else ', no tokenizer'})")


def cmd_data_prepare(args) -> None:
    import contextlib
    import os

    from gemmalab.data.config import load_data_config
    from gemmalab.data.pipeline import prepare

    config = load_data_config(args.config)
    out = Path(args.out or config.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def stderr_to(path: Path):
        """datatrove's workers log every step at INFO to file descriptor 2: send it to a file instead."""
        saved = os.dup(2)
        with open(path, "w") as log:
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)

    print(f"preparing {args.config} into {out} (datatrove logs: {out / 'prepare.log'})", flush=True)
    with contextlib.nullcontext() if args.verbose else stderr_to(out / "prepare.log"):
        card = prepare(config, out)
    if card is None:
        print("submitted to Slurm; once the jobs finish, gemmalab.data.pipeline.finish(config, out) writes the card")
        return
    print(f"{card.documents_in} documents in, {card.documents_out} kept, {card.documents_dropped} dropped "
          f"(counts reconcile: {card.reconciled}); malformed lines: {sum(card.malformed_lines.values())}")
    print(f"data card: {out / 'data_card.json'}")
    if (out / "tokens" / "meta.json").exists():
        meta = json.loads((out / "tokens" / "meta.json").read_text())
        print(f"token shards: {out / 'tokens'} ({meta['num_tokens']:,} tokens, vocabulary {meta['vocab_size']:,})")


def cmd_pretrain(args) -> int:
    from gemmalab.train.trainer import run_from_args

    return run_from_args(args)


def cmd_eval(args) -> None:
    from gemmalab.evaluate import evaluate, load_task
    from gemmalab.evaluate.sandbox import Limits
    from gemmalab.inference import Engine

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise GemmalabError("--tasks names no task.")
    if args.limit is not None and args.limit < 1:
        raise GemmalabError(f"--limit must be >= 1, got {args.limit}.")
    tasks = [load_task(n, args.data_dir) for n in names]  # bad task files fail before the model loads
    _set_threads(args)
    model, tokenizer = _load(args)
    engine = Engine(model, _require_tokenizer(tokenizer, args.model), max_batch_size=args.batch_size)
    result = evaluate(engine, tasks, args.out, model=args.model, limit=args.limit, seed=args.seed,
                      allow_code_execution=args.allow_code_execution, sandbox_limits=Limits(timeout_s=args.code_timeout))
    for name in names:
        r = result["tasks"][Path(name).stem if name.endswith(".toml") else name]
        print(f"{Path(name).stem:<16} {r['metric']:<12} {r['value']:.4f}  (n={r['n']})")
    print(f"wrote {Path(args.out) / 'result.json'} and per-sample records in {Path(args.out) / 'samples'}")


def cmd_tokenizer_train(args) -> None:
    from gemmalab.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.out, input_sentence_size=args.input_sentence_size,
                          seed=args.seed)
    print(f"wrote {Path(args.out) / 'tokenizer.model'} ({tok.vocab_size} pieces)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmalab", description="The Gemma recipe on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt")
    _add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma dialogue template")
    _add_sampling(p, temperature=0.0, max_new_tokens=64)
    p.add_argument("--json", action="store_true", help='print {"prompt_ids", "ids", "text"}')
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the Gemma dialogue format")
    _add_model(p)
    p.add_argument("--system", help="a system message (folded into the first user turn)")
    _add_sampling(p, temperature=0.7, max_new_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (docs/serve.md)")
    _add_model(p)
    p.add_argument("--model-name", help="name clients use (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1", help="no authentication: keep 127.0.0.1 unless the network is trusted")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=64, help="prompts that may wait; beyond it requests get 429")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow to start on CPU)")
    _add_runtime(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tokenize", help="text to token ids")
    p.add_argument("--model", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--input", help='JSONL file, one {"text": ...} object per line')
    p.add_argument("--no-bos", action="store_true")
    p.add_argument("--json", action="store_true", help='one {"ids": [...]} object per input')
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("convert", help="convert a checkpoint (HF dir, .gguf, .ckpt) to the HF layout")
    p.add_argument("model", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", default="hf")
    p.add_argument("--preset", help="model preset for a gemma_pytorch .ckpt (e.g. gemma-2b)")
    p.add_argument("--tokenizer", help="tokenizer.model to include (default: the source's own)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("data", help="data preparation")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="filter, decontaminate, deduplicate and pack a corpus (datatrove)")
    d.add_argument("--config", required=True, help="TOML, e.g. configs/data/builtin.toml")
    d.add_argument("--out", help="output folder (default: the config's out_dir)")
    d.add_argument("--verbose", action="store_true", help="show datatrove's logs")
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("pretrain", help="pretrain a model (docs/train.md; torchrun for several devices)")
    p.add_argument("--config", required=True, help="TOML config, e.g. configs/train/tiny.toml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.add_argument("--out", help="run directory (default: the config's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the plan (parameters, memory, tokens) and exit")
    p.add_argument("--world-size", type=int, help="devices for --dry-run (default: WORLD_SIZE, else 1)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="benchmarks: MMLU, MBPP, HumanEval, GSM8K, multiple choice (docs/evaluate.md)")
    _add_model(p)
    p.add_argument("--tasks", required=True, help="comma-separated: mmlu,mbpp,humaneval,gsm8k,arc_easy,... or task .toml files")
    p.add_argument("--data-dir", type=Path, help="local task files, DIR/TASK/... in the published formats")
    p.add_argument("--limit", type=int, help="first N samples of each task")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run model-written code (HumanEval, MBPP) in the bubblewrap sandbox")
    p.add_argument("--code-timeout", type=float, default=3.0, help="seconds per program in the sandbox")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234, help="for sampled generations")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="run directory (resumes if it holds this run)")
    _add_runtime(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a SentencePiece tokenizer with Gemma's settings")
    t.add_argument("--input", nargs="+", required=True, help="text or JSONL files (.gz allowed)")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--input-sentence-size", type=int, default=0, help="sample this many texts (0: all)")
    t.add_argument("--seed", type=int, default=0, help="of the sample (the same inputs and seed: the same model)")
    t.set_defaults(func=cmd_tokenizer_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` overrides may follow other flags (`pretrain --config F --resume train.steps=9`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except GemmalabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
