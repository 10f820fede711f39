"""`gemmalab serve`: the OpenAI-compatible HTTP server (docs/serve.md)."""

from __future__ import annotations

import argparse

from gemmalab.cli.common import (add_model, add_runtime, load_runtime_model, port, positive_float, positive_int,
                                 require_tokenizer)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (docs/serve.md)")
    add_model(p)
    p.add_argument("--model-name", help="name clients use (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1", help="no authentication: keep 127.0.0.1 unless the network is trusted")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--max-batch-size", type=positive_int, default=32, help="rows decoded together")
    p.add_argument("--max-queue", type=positive_int, default=64, help="prompts that may wait; beyond it requests get 429")
    p.add_argument("--kv-cache-gib", type=positive_float, default=4.0,
                   help="memory for the running rows' keys and values; requests wait for room beyond it")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="the most new tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=positive_int, help="the longest prompt taken (default: the context)")
    p.add_argument("--max-body-bytes", type=positive_int, default=4 * 2**20, help="larger request bodies get 413")
    p.add_argument("--request-timeout-s", type=positive_float, default=600.0,
                   help="a request still running after this long is stopped (504)")
    add_runtime(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.inference import Engine
    from gemmalab.serve import ServeConfig, serve

    config = ServeConfig(max_batch_size=args.max_batch_size, max_queue=args.max_queue, kv_cache_gib=args.kv_cache_gib,
                         max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                         max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout_s)
    model, tokenizer = load_runtime_model(args)
    engine = Engine(model, require_tokenizer(tokenizer, args.model), max_batch_size=args.max_batch_size)
    serve(engine, args.model_name or str(args.model), host=args.host, port=args.port, config=config)
