"""The ``vramlab`` command. Each subcommand is a thin shell over a pure function.

Imports stay lazy: ``vramlab estimate`` never imports torch or transformers.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from estimator.cli_args import add_setup_arguments, setup_from_args


class UsageError(Exception):
    """Bad input from the user: one sentence on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="shipped name (e.g. llama-2-7b), path to config.json or folder, or hub id")


def cmd_estimate(args) -> int:
    from estimator.estimate import estimate
    from estimator.gpus import get_gpu
    from estimator.modelspec import load_model
    spec = load_model(args.model)
    setup = setup_from_args(args)
    gpu = get_gpu(args.gpu) if args.gpu else None
    est = estimate(spec, setup, gpu)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        from estimator.report import estimate_table, print_table
        print_table(estimate_table(est))
        for note in est.notes:
            print(f"note: {note}")
        if gpu:
            verdict = "fits" if est.total_bytes <= gpu.memory_bytes else "does NOT fit"
            print(f"{verdict} on {gpu.name} ({gpu.memory_bytes / 2**30:.1f} GiB)")
    return 0


def cmd_fit(args) -> int:
    from estimator.fit import fit
    from estimator.gpus import get_gpu
    from estimator.modelspec import load_model
    from estimator.units import parse_bytes
    if bool(args.gpu) == bool(args.memory):
        raise UsageError("fit needs exactly one of --gpu NAME or --memory SIZE (e.g. --memory 24GiB)")
    gpu = get_gpu(args.gpu) if args.gpu else None
    memory = gpu.memory_bytes if gpu else parse_bytes(args.memory)
    result = fit(load_model(args.model), setup_from_args(args), memory, gpu)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        from estimator.report import fit_table, print_table
        print_table(fit_table(result))
        if result.min_gpus:
            print(f"ZeRO-3 needs {result.min_gpus} GPUs of this size for the setup as given.")
    return 0


def cmd_rules(args) -> int:
    from estimator.rules import rules_table
    rows = rules_table(batch=int(args.batch), seq=int(args.seq))
    if args.json:
        print(json.dumps([{"size": r.size, "model": r.model, "params": r.params, "setting": r.setting,
                           "rule_low_bytes": r.rule_low_bytes, "rule_high_bytes": r.rule_high_bytes,
                           "estimate_total_bytes": r.estimate.total_bytes,
                           "causes": [{"cause": c, "bytes": b} for c, b in r.causes]} for r in rows], indent=2))
    else:
        from estimator.report import print_table, rules_tables
        print_table(rules_tables(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vramlab", description="Estimate, measure and validate GPU memory of LLM training.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    p = sub.add_parser("estimate", help="predict peak memory of one step, per category")
    _add_model(p)
    add_setup_arguments(p)
    p.add_argument("--gpu", help="GPU preset (sets the cuBLAS workspace and says whether it fits)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.set_defaults(func=cmd_estimate)
    p = sub.add_parser("fit", help="largest batch / longest sequence and strategies that fit a budget")
    _add_model(p)
    add_setup_arguments(p)
    p.add_argument("--gpu", help="GPU preset, e.g. a100-80gb, h100-80gb, rtx-4090")
    p.add_argument("--memory", help="memory budget, e.g. 24GiB or 80GB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("rules", help="the rules of thumb for 1B, 7B, 70B beside the detailed estimate")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args)
    except (UsageError, ValueError) as exc:
        print(f"vramlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vramlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
