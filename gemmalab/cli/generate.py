"""`gemmalab generate`: continue one prompt."""

from __future__ import annotations

import argparse
import json

from gemmalab.cli.common import add_model, add_sampling, load_runtime_model, require_tokenizer


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt")
    add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma dialogue template")
    add_sampling(p, temperature=0.0, max_new_tokens=64)
    p.add_argument("--json", action="store_true", help='print {"prompt_ids", "ids", "text"}')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.inference import generate

    model, tokenizer = load_runtime_model(args)
    tokenizer = require_tokenizer(tokenizer, args.model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    out = generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)[0]
    if args.json:
        print(json.dumps({"prompt_ids": out.prompt_ids, "ids": out.ids, "text": out.text}, ensure_ascii=False))
    else:
        print((args.prompt if not args.chat else "") + out.text)
