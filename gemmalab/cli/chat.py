"""`gemmalab chat`: interactive chat in the Gemma dialogue format."""

from __future__ import annotations

import argparse

from gemmalab.cli.common import add_model, add_sampling, load_runtime_model, require_tokenizer


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat in the Gemma dialogue format")
    add_model(p)
    p.add_argument("--system", help="a system message (folded into the first user turn)")
    add_sampling(p, temperature=0.7, max_new_tokens=512)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.inference import Engine, SamplingParams
    from gemmalab.inference.chat import run_chat

    model, tokenizer = load_runtime_model(args)
    engine = Engine(model, require_tokenizer(tokenizer, args.model), max_batch_size=1)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    run_chat(engine, params, args.system, str(args.model))
