"""`gemmalab data prepare`: filter, decontaminate, deduplicate and pack a corpus (docs/data.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmalab.errors import GemmalabError


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="data preparation")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="filter, decontaminate, deduplicate and pack a corpus (datatrove)")
    d.add_argument("--config", required=True, help="TOML, e.g. configs/data/builtin.toml")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. executor.tasks=4")
    d.add_argument("--out", help="output folder (default: the config's out_dir)")
    d.add_argument("--verbose", action="store_true", help="show datatrove's logs")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.config import load
    from gemmalab.data.config import DataConfig
    from gemmalab.data.pipeline import prepare
    from gemmalab.runs import read_result

    config = load(DataConfig, args.config, args.overrides)
    out = Path(args.out or config.out_dir)
    log_file = None if args.verbose else out / "prepare.log"
    print(f"preparing {args.config} into {out}" + (f" (datatrove logs: {log_file})" if log_file else ""), flush=True)
    card = prepare(config, out, log_file=log_file)
    if card is None:
        print("submitted to Slurm; once the jobs finish, gemmalab.data.pipeline.finish(config, out) writes the card")
        return
    result = read_result(out)
    print(f"{card.documents_in} documents in, {card.documents_out} kept, {card.documents_dropped} dropped "
          f"(counts reconcile: {card.reconciled}); malformed lines: {result['malformed_lines']}")
    print(f"data card: {result['data_card']}")
    if "tokens" in result:
        print(f"token shards: {result['token_shards']} ({result['tokens']:,} tokens, vocabulary {result['vocab_size']:,})")
    if not card.reconciled:  # documents were lost or counted twice: the output cannot be trusted as complete
        off = [f"{name} ({s['documents_in']} in, {s['documents_out']} out, {s['documents_dropped']} dropped)"
               for name, s in card.sources.items() if not s.get("reconciled", True)]
        raise GemmalabError(f"{result['data_card']}: the counts do not reconcile (documents in != out + dropped) for "
                            f"{', '.join(off) or 'the total'}.")
