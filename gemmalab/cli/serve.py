"""`gemmalab serve`: the OpenAI-compatible HTTP server (docs/serve.md)."""

from __future__ import annotations

import argparse

from gemmalab.cli.common import (add_model, add_runtime, load_runtime_model, nonnegative_float, port, positive_int,
                                 require_tokenizer)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (docs/serve.md)")
    add_model(p)
    p.add_argument("--model-name", help="name clients use (default: the --model value)")
    p.add_argument("--host", default="127.0.0.1", help="no authentication: keep 127.0.0.1 unless the network is trusted")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--max-batch-size", type=positive_int, default=32)
    p.add_argument("--max-queue", type=positive_int, default=64, help="prompts that may wait; beyond it requests get 429")
    p.add_argument("--batch-wait-ms", type=nonnegative_float, default=5.0)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow to start on CPU)")
    add_runtime(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.inference import Engine
    from gemmalab.inference.server import serve

    model, tokenizer = load_runtime_model(args)
    engine = Engine(model, require_tokenizer(tokenizer, args.model), max_batch_size=args.max_batch_size,
                    compile=args.compile)
    serve(engine, args.model_name or str(args.model), host=args.host, port=args.port, max_queue=args.max_queue,
          batch_wait_ms=args.batch_wait_ms)
