"""The ``vramlab`` command. Each subcommand is a thin shell over a pure function.

Imports stay lazy: ``vramlab estimate`` never imports torch or transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from estimator.cli_args import add_setup_arguments, flag_warnings, setup_from_args
from estimator.files import make_folder, write_atomic
from profiler.sweeps.matrix import MAX_CASES

#: the shipped benchmark of published GPU measurements (results/published/build.py)
PUBLISHED_RECORDS = str(Path(__file__).resolve().parents[1] / "results" / "published" / "records.jsonl")


class UsageError(Exception):
    """Bad input from the user: one sentence on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="shipped name (e.g. llama-2-7b), path to config.json or folder, or hub id")


def _setup(args, device: str | None = None):
    """The Setup of the setup flags. Each flag it ignores gets a one-line warning on stderr
    once the command has succeeded (a failing command prints its one error line only)."""
    setup = setup_from_args(args, device)
    args.warnings = flag_warnings(args)
    gpu = _gpu(args) if getattr(args, "gpu", None) is not None else None
    if gpu is not None and not setup.compute_capability:
        # the card decides the sdpa kernel (flash needs sm80+: kernels.has_flash), not only the
        # workspaces: --gpu t4 runs 16-bit sdpa on the memory-efficient kernel
        setup = setup.replace(compute_capability=gpu.compute_capability)
    return setup


def _gpu(args):
    """The --gpu preset, None without --gpu; an empty --gpu is a UsageError, not "no GPU"."""
    from estimator.gpus import get_gpu, gpu_presets
    if args.gpu is None:
        return None
    if not args.gpu.strip():
        raise UsageError(f"--gpu is empty; name a GPU preset ({', '.join(sorted(gpu_presets()))})")
    return get_gpu(args.gpu)


def _overheads(args, setup, gpu):
    """--calibration FILE | none | auto (default): auto picks the committed calibration that
    matches the device semantics (cpu) or the named GPU (cuda), else the defaults."""
    from estimator.calibration import find_calibration, load_calibration
    from estimator.overheads import DEFAULT
    choice = getattr(args, "calibration", "auto") or "auto"
    if choice == "none":
        return DEFAULT
    if choice != "auto":
        return load_calibration(choice)
    if setup.device.value == "cpu":
        found = find_calibration("cpu")
    else:
        found = find_calibration("cuda", gpu.name) if gpu else None
    return load_calibration(found) if found else DEFAULT


def cmd_estimate(args) -> int:
    from estimator.estimate import estimate
    from estimator.modelspec import load_model
    from estimator.units import format_gib
    setup = _setup(args)
    gpu = _gpu(args)
    spec = load_model(args.model)
    overheads = _overheads(args, setup, gpu)
    lengths = _seq_lengths(args, setup, lambda s: estimate(spec, s, gpu, overheads).total_bytes)
    if lengths is not None:
        setup = lengths.bound  # the worst batch any order can form: the safe figure
    est = estimate(spec, setup, gpu, overheads)
    if args.json:
        from estimator.estimate import assumed_versions
        extra = {"seq_lengths": lengths.to_dict()} if lengths is not None else {}
        print(json.dumps(dict(est.to_dict(), assumed_versions=assumed_versions(spec, setup), **extra), indent=2))
    else:
        from estimator.report import estimate_table, non_tensor_lines, print_table, print_text
        print_table(estimate_table(est), wide=args.wide)
        for line in non_tensor_lines(est):
            print_text(line, wide=args.wide)
        for note in est.notes:
            print_text(f"note: {note}", wide=args.wide)
        if lengths is not None:
            print_text(_seq_lengths_line(lengths, lambda s: estimate(spec, s, gpu, overheads).total_bytes),
                       wide=args.wide)
        assumed = setup.semantics.to_dict()["versions"]
        print_text("assumed: " + ", ".join(f"{k} {v}" for k, v in assumed.items()), wide=args.wide)
        if gpu:
            verdict = "fits" if est.total_bytes <= gpu.memory_bytes else "does NOT fit"
            print_text(f"{verdict} on {gpu.name} ({format_gib(gpu.memory_bytes, 1)})", wide=args.wide)
    return 0


def _seq_lengths(args, setup, peak):
    """--seq-lengths FILE: the worst batch of the file's examples (estimator/lengths.py), None without it."""
    if getattr(args, "seq_lengths", None) is None:
        if getattr(args, "seed", None) is not None:
            raise UsageError("--seed orders --seq-lengths' examples; pass --seq-lengths FILE with it")
        return None
    from estimator.lengths import TRAINER_SEED, read_lengths, worst_batch
    try:
        seed = TRAINER_SEED if args.seed is None else int(args.seed)
    except ValueError:
        seed = -1
    if seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed!r}")
    return worst_batch(setup, read_lengths(args.seq_lengths), peak, seed)


def _seq_lengths_line(w, peak) -> str:
    """What --seq-lengths found, in one line."""
    from estimator.units import format_gib
    shape = f"({w.bound.batch} x {w.bound.seq}, {w.bound.packing})"
    if w.step is None:
        return (f"seq lengths: {w.examples:,} examples, {w.steps:,} steps an epoch; packed bins hold --seq tokens "
                f"whatever the lengths, so every full batch is the worst {shape}: the estimate above")
    longest = ", ".join(map(str, w.bound_lengths))
    seeded = ", ".join(map(str, w.lengths))
    return (f"seq lengths: {w.examples:,} examples, {w.steps:,} steps an epoch; the estimate above is the worst "
            f"batch any order can form, the longest examples together ({longest}) {shape}; in the Trainer's "
            f"order (seed {w.seed}) epoch 1's worst is step {w.step} ({seeded}; {w.worst.batch} x {w.worst.seq}): "
            f"{format_gib(peak(w.worst), 2)}")


def cmd_fit(args) -> int:
    from estimator.fit import fit
    from estimator.modelspec import load_model
    from estimator.units import parse_bytes
    if (args.gpu is None) == (args.memory is None):
        raise UsageError("fit needs exactly one of --gpu NAME or --memory SIZE (e.g. --memory 24GiB)")
    if args.memory is not None and not args.memory.strip():
        raise UsageError("--memory is empty; give a size, e.g. --memory 24GiB or 80GB")
    gpu = _gpu(args)
    memory = gpu.memory_bytes if gpu else parse_bytes(args.memory)
    setup = _setup(args)
    result = fit(load_model(args.model), setup, memory, gpu, _overheads(args, setup, gpu))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        from estimator.report import fit_figures_table, fit_recipes_table, fit_table, print_table, print_text
        print_table(fit_table(result), wide=args.wide)
        print_table(fit_recipes_table(result), wide=args.wide)
        print_table(fit_figures_table(result), wide=args.wide)
        print_text(result.verdict(), wide=args.wide)
    return 0


def cmd_rules(args) -> int:
    from estimator.rules import rules_table
    rows = rules_table(batch=int(args.batch), seq=int(args.seq))
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        from estimator.report import print_table, rules_tables
        print_table(rules_tables(rows, wide=args.wide), wide=args.wide)
    return 0


def cmd_profile(args) -> int:
    from estimator.modelspec import load_model
    from profiler.measure.run import run_case
    from profiler.record import append_record
    from profiler.show import print_records
    spec = load_model(args.model)  # bad names fail before torch is imported
    setup = _setup(args, device="cpu" if args.backend == "cpu" else None)
    steps = _positive(args.steps, "steps")
    nproc = _positive(args.nproc, "nproc")
    if setup.trainer.value != "hf" and nproc > 1:
        raise UsageError(f"--trainer {setup.trainer.value} is measured on one device: --nproc does not run TRL's "
                         f"trainers yet; leave --nproc 1, or use vramlab estimate")
    if nproc > 1:
        records = _profile_distributed(args, setup, steps, nproc)
    else:
        records = [run_case(args.model, setup, args.backend, steps=steps, timeline=args.timeline, spec=spec)]
        if args.out:
            append_record(args.out, records[0])
    if args.json:
        objs = [r.to_json() for r in records]
        print(json.dumps(objs[0] if len(objs) == 1 else objs, indent=2))
    else:
        print_records(records, wide=args.wide)
    return 0 if all(r.status.value in ("ok", "oom") for r in records) else 1


def _profile_distributed(args, setup, steps: int, nproc: int):
    """--nproc N: torchrun with DDP, FSDP2 or FSDP1 (cpu: gloo, cuda: nccl); sim: rank 0 of N
    on a fake process group (FSDP2). One record per rank."""
    from profiler.measure.distributed import MEASURED, run_distributed, run_sim_rank0
    from profiler.record import append_record
    if setup.sharding not in MEASURED:
        raise UsageError(f"--nproc {nproc} needs --sharding ddp, fsdp, fsdp1 or fsdp1-shard-grad-op "
                         f"(zero3 runs as fsdp)")
    setup = setup.replace(world_size=nproc)
    if args.backend != "sim":
        return run_distributed(args.model, setup, backend=args.backend, steps=steps, nproc=nproc, out=args.out)
    records = [run_sim_rank0(args.model, setup, nproc, steps=steps)]
    if args.out:
        append_record(args.out, records[0])
    return records


def _positive(text, name: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"--{name} must be a positive integer, got {value}")
    return value


def _seconds(text, name: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} takes a number of seconds, got {text!r}") from None


def _say(stream, text: str, end: str = "\n") -> None:
    """``print`` that outlives its reader: once a pipe is closed (``| head``), what it would
    have read goes to /dev/null and the command goes on."""
    try:
        print(text, file=stream, end=end, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def cmd_sweep(args) -> int:
    import math

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from profiler.sweeps.matrix import parse_shard
    from profiler.sweeps.sweep import sweep
    shard = parse_shard(args.shard)
    timeout_s = _seconds(args.case_timeout, "case-timeout")
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise UsageError(f"--case-timeout must be a finite positive number of seconds, got {args.case_timeout!r}")
    try:
        retries = int(args.retries)
    except ValueError:
        retries = -1
    if retries < 0:
        raise UsageError(f"--retries must be a non-negative integer, got {args.retries!r}")
    counts = {"ok": 0, "oom": 0, "error": 0, "skipped": 0}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
                  disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("sweep", total=None)

        def on_start(total, done):
            progress.update(task, total=total - done)
            _say(sys.stderr, f"{total} cases in shard {args.shard}; {done} already in {args.out}; "
                             f"running {total - done}")
            if done and done == total:
                _say(sys.stderr, f"nothing to run: every case is in {args.out} (a sweep resumes);")
                _say(sys.stderr, "to measure again, move that file away or pass a new --out")

        def on_case(n, total, record):
            counts[record.status.value] += 1
            progress.update(task, advance=1, description=f"{record.case.model} {record.status}")
            if not sys.stderr.isatty():
                _say(sys.stderr, f"[{n}/{total}] {record.case.label()}: {record.status}")

        def on_skip(n, total, job, sentence):
            counts["skipped"] += 1
            progress.update(task, advance=1)
            _say(sys.stderr, f"[{n}/{total}] {job.case.label()}: skipped: {sentence}")

        sweep(args.matrix, args.backend, args.out, shard=shard, timeout_s=timeout_s, on_case=on_case,
              timeline=args.timeline, retries=retries, on_start=on_start, on_skip=on_skip,
              warn=lambda text: _say(sys.stderr, f"vramlab: warning: {text}"),
              max_cases=_positive(args.max_cases, "max-cases"))
    skipped = f", {counts['skipped']} skipped (an optional extra is not installed)" if counts["skipped"] else ""
    _say(sys.stdout, f"done: {counts['ok']} ok, {counts['oom']} oom, {counts['error']} error{skipped} -> {args.out}")
    return 0


def cmd_campaign(args) -> int:
    """A whole matrix in persistent workers, several at once where the card allows."""
    from pathlib import Path

    from estimator.units import parse_bytes
    from profiler.sweeps.campaign import Campaign, seconds_table
    out = make_folder(args.out, "campaign folder")
    records = Path(args.records) if args.records else out / f"{args.backend}-{Path(args.matrix).stem}.jsonl"
    from profiler.measure.procs import python_command
    tests = python_command("pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests") if args.tests else None
    campaign = Campaign(args.matrix, args.backend, records,
                        workers=_positive(args.workers, "workers") if args.workers else None,
                        budget_s=_seconds(args.budget_s, "budget-s"),
                        case_timeout_s=_seconds(args.case_timeout, "case-timeout"),
                        card_bytes=parse_bytes(args.card_memory) if args.card_memory else None,
                        tests=tests, tests_log=out / "gpu-tests.log", log_dir=out,
                        say=lambda line: print(line, file=sys.stderr, flush=True),
                        max_cases=_positive(args.max_cases, "max-cases"))
    summary = campaign.run()
    summary["commit"] = args.commit
    write_atomic(out / "campaign.json", json.dumps(summary, indent=2) + "\n", "campaign summary")
    print(seconds_table(summary), end="")
    if summary["interrupted"]:
        return EXIT_INTERRUPTED
    if summary["not_run"]:
        print(f"stopped at the budget: {summary['not_run']} of {summary['cases_planned']} cases not run (exit 1);\n"
              f"the finished ones are in {records};\nthe same command again runs only the rest", file=sys.stderr)
    return 0 if summary["not_run"] == 0 and summary["counts"].get("error", 0) == 0 else 1


def _read_all(paths):
    """Every record of the files; an unfinished last line (a write cut short) is skipped
    with a warning naming it, as a sweep does."""
    from profiler.record import read_records

    def warn(text):
        print(f"vramlab: warning: {text}", file=sys.stderr)
    return [r for path in paths for r in read_records(path, allow_partial_tail=True, warn=warn)]


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from estimator.report import print_table, print_text
    from profiler.analysis.calibrate import calibrate, write_calibration
    from profiler.analysis.validate import with_estimates
    from profiler.show import summary_table
    out = Path(args.out)
    records, _, _ = with_estimates(_read_all(args.records), args.estimate)
    result = calibrate(records, [Path(p) for p in args.records], args.name or out.stem)
    written = write_calibration(out, result)
    print_table(summary_table(result["fit"]["summary"], f"calibration {result['name']}: "
                              f"{result['cases_used']} cases, factors {result['overheads']['activation_factors']}, "
                              f"constant {result['overheads']['constant_bytes']} B"), wide=args.wide)
    print_text(f"wrote {out}" if written else f"kept {out}: the same fit (only its creation time would change)",
               wide=args.wide)
    return 0


def cmd_validate_published(args) -> int:
    from estimator.report import print_table
    from profiler.analysis.published import rows_table_md, validate_published
    from profiler.show import published_tables, summary_table
    result = validate_published(args.published)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    summary = result.to_dict()
    for metric, s in summary["by_metric"].items():
        print_table(summary_table({k: v for k, v in s.items() if k != "cases"},
                                  f"{s['cases']} pinned published rows, {metric}: error as a fraction of the value"),
                    wide=args.wide)
    from estimator.report import print_text
    for metric, column in summary["headline"].items():
        if column["cases"]:
            continue  # its table is above
        left = "; ".join(f"{n} {why}" for why, n in column["left_out"].items()) or "none published"
        print_text(f"{metric} (vs the estimate's {column['figure']}): 0 pinned rows of {column['published']} "
                   f"published; left out: {left}", wide=args.wide)
    if args.wide:
        print(rows_table_md(result))
    else:
        for table in published_tables(result):
            print_table(table)
    return 0


def cmd_validate(args) -> int:
    from pathlib import Path

    from estimator.calibration import load_calibration
    from profiler.analysis.validate import validate
    if args.published:
        return cmd_validate_published(args)
    if not args.records:
        raise UsageError("validate needs record files, or --published for the published GPU measurements")
    from profiler.analysis.validate import with_estimates
    calibration = load_calibration(args.calibration) if args.calibration else None
    records, redone, moved = with_estimates(_read_all(args.records), args.estimate)
    result = validate(records, calibration)
    which = (f"estimate: current (today's estimator under each record's versions; {moved} of {redone} differ from "
             f"the recorded)" if args.estimate == "current" else "estimate: recorded (as each record ran)")
    if args.report:
        from profiler.analysis.report import write_report
        written = write_report(result, records, Path(args.report), args.title or "vramlab validation")
        print(f"report: {written['html']} (+ {len(written) - 1} files beside it)", file=sys.stderr)
    if args.json:
        print(json.dumps(dict(result.to_dict(), estimate={"which": args.estimate, "re_estimated": redone,
                                                           "differing": moved}), indent=2))
    else:
        from estimator.report import print_table
        from profiler.analysis.report import cases_table_md, categories_table_md
        from profiler.show import cases_table, summary_table
        title = f"{len(result.rows)} cases: error as a fraction of the measured peak; {which}"
        print_table(summary_table(result.summaries, title), wide=args.wide)
        if args.wide:
            print(cases_table_md(result))
            print()
            print(categories_table_md(result))
        else:
            print_table(cases_table(result))
    return 0


def cmd_compare(args) -> int:
    """Exit 0: no regression; 1: a regression, missing cases or nothing matched; 2: records
    that cannot be compared (unreadable, empty, one case twice) or a bad threshold."""
    from profiler.analysis.compare import Threshold, compare, markdown, parse_points
    threshold = Threshold.parse(args.threshold)
    error_growth = parse_points(args.error_growth) if args.error_growth is not None else None
    baseline, current = _read_all([args.baseline]), _read_all([args.current])
    result = compare(baseline, current, threshold, error_growth, names=(args.baseline, args.current))
    text = markdown(result, threshold, allow_missing=args.allow_missing)
    if args.out:
        write_atomic(args.out, text, "compare report")
    _say(sys.stdout, text, end="")  # the verdict stands when nobody reads the report
    return 1 if result.failures(args.allow_missing) else 0


def cmd_loop(args) -> int:
    """The whole loop on the embedded quick matrix: profile, calibrate, validate, report."""
    from pathlib import Path

    from estimator.report import print_table
    from profiler.analysis.pipeline import quick_loop
    from profiler.show import summary_table
    backend = args.backend
    if backend == "auto":
        import torch
        backend = "cuda" if torch.cuda.is_available() else "cpu"
    result, written = quick_loop(Path(args.out), backend, lambda line: print(line, file=sys.stderr))
    print_table(summary_table(result.summaries, f"{len(result.rows)} cases on {backend}: |error| vs measured peak"),
                wide=args.wide)
    print(f"report: {written['html']}")
    return 0


def _add_wide(p: argparse.ArgumentParser, what: str = "tables at their natural width") -> None:
    """``--wide``: output is folded to the terminal's width (80 columns when it is no
    terminal) unless asked for this."""
    p.add_argument("--wide", action="store_true", help=f"{what}, not folded to the terminal's width")


def _matrix_parser(sub, name: str, help: str, backend: str, out: str, case_timeout: str) -> argparse.ArgumentParser:
    """A command that runs a matrix: its file, the backend, where records go, a case timeout."""
    p = sub.add_parser(name, help=help)
    p.add_argument("matrix")
    p.add_argument("--backend", default=backend, choices=("cuda", "cpu", "sim"))
    p.add_argument("--out", required=True, help=out)
    p.add_argument("--case-timeout", default=case_timeout,
                   help=f"seconds before a case is stopped (default {case_timeout})")
    p.add_argument("--max-cases", default=str(MAX_CASES),
                   help=f"refuse a matrix of more cases than this (default {MAX_CASES})")
    return p


def _add_estimate(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--estimate", default="current", choices=("current", "recorded"),
                   help=f"the prediction to {what}: current (default), today's estimator under each record's "
                        f"library versions; recorded, the estimate frozen in each record when it ran")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vramlab", description="Estimate, measure and validate GPU memory of LLM training.",
                     epilog=EXIT_CODES)
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    p = sub.add_parser("estimate", help="predict peak memory of one step, per category")
    _add_model(p)
    add_setup_arguments(p)
    p.add_argument("--gpu", help="GPU preset (sets the cuBLAS workspace and says whether it fits)")
    p.add_argument("--calibration", default="auto", help="calibration JSON, 'none', or 'auto' (default)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.add_argument("--seq-lengths", default=None, metavar="FILE",
                   help="--trainer sft: the dataset's example lengths (a JSON list, one length per line, or "
                        "LENGTH COUNT per line); --seq is max_length; the estimate is the worst batch any order "
                        "can form, with the worst step of the Trainer's seeded order")
    p.add_argument("--seed", default=None, help="with --seq-lengths: the Trainer's seed (data_seed or seed; "
                                                "default 42, TrainingArguments')")
    _add_wide(p)
    p.set_defaults(func=cmd_estimate)
    p = sub.add_parser("fit", help="largest batch / longest sequence and strategies that fit a budget")
    _add_model(p)
    add_setup_arguments(p)
    p.add_argument("--gpu", help="GPU preset, e.g. a100-80gb, h100-80gb, rtx-4090")
    p.add_argument("--memory", help="memory budget, e.g. 24GiB or 80GB")
    p.add_argument("--calibration", default="auto", help="calibration JSON, 'none', or 'auto' (default)")
    p.add_argument("--json", action="store_true")
    _add_wide(p)
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("rules", help="the rules of thumb for 1B, 7B, 70B beside the detailed estimate")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    _add_wide(p, "every cause in full, with the model and recipe columns (120+ columns)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules)
    p = sub.add_parser("profile", help="run real steps and measure them beside the estimate")
    _add_model(p)
    add_setup_arguments(p)
    p.add_argument("--backend", default="cpu", choices=("cuda", "cpu", "sim"))
    p.add_argument("--steps", default="2", help="measured steps after one warm-up step (default 2)")
    p.add_argument("--out", help="append the record to this JSONL file")
    p.add_argument("--timeline", action="store_true", help="keep the tracker's memory timeline in the record")
    p.add_argument("--nproc", default="1", help="ranks: > 1 runs DDP/FSDP2/FSDP1 under torchrun (sim: rank 0 of N)")
    p.add_argument("--json", action="store_true", help="print the record")
    _add_wide(p)
    p.set_defaults(func=cmd_profile)
    p = _matrix_parser(sub, "sweep", "run a TOML matrix, one subprocess per case, resumable", backend="cpu",
                       out="JSONL file; cases already in it are skipped", case_timeout="900")
    p.add_argument("--shard", default="0/1", help="I/N: run every N-th case from the I-th")
    p.add_argument("--timeline", action="store_true", help="keep each run's memory timeline")
    p.add_argument("--retries", default="0", help="run a case again when a signal killed its worker "
                                                  "(not on OOM or a timeout); default 0")
    p.set_defaults(func=cmd_sweep)
    p = _matrix_parser(sub, "campaign", "a whole matrix in persistent workers, in parallel where the card allows",
                       backend="cuda", out="folder for records, campaign.json, worker and test logs",
                       case_timeout="120")
    p.add_argument("--records", help="JSONL file (default OUT/BACKEND-MATRIX.jsonl); its cases are skipped")
    p.add_argument("--budget-s", default="330", help="stop starting cases and end after this many seconds")
    p.add_argument("--workers", help="worker processes (default: 3 on cuda, 2 otherwise, at most the cores)")
    p.add_argument("--card-memory", help="memory the cases share, e.g. 80GiB (default: CUDA's free "
                                         "memory; 80GiB for sim and cpu)")
    p.add_argument("--tests", action="store_true", help="run the gpu-marked tests beside the cases")
    p.add_argument("--commit", default="", help="commit id to record in campaign.json")
    p.set_defaults(func=cmd_campaign)
    p = sub.add_parser("calibrate", help="fit activation factors and overheads to measured records")
    p.add_argument("records", nargs="+")
    p.add_argument("--out", required=True, help="calibration JSON, e.g. results/calibration/NAME.json")
    p.add_argument("--name", help="name stored in the file (default: the file's stem)")
    _add_estimate(p, "fit to")
    _add_wide(p)
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("validate", help="predicted beside measured, with error summaries and a report")
    p.add_argument("records", nargs="*")
    p.add_argument("--published", nargs="?", const=str(PUBLISHED_RECORDS), default=None, metavar="FILE",
                   help="the published GPU measurements (default results/published/records.jsonl) "
                        "beside vramlab and the simpler predictors")
    p.add_argument("--calibration", help="calibration JSON to apply beside the uncalibrated estimate")
    p.add_argument("--report", help="folder for PNG plots, report.html and summary.md")
    p.add_argument("--title", help="report title")
    _add_estimate(p, "validate")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_wide(p, "every predictor and category per case, as markdown tables (up to ~370 columns)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("compare", help="baseline vs current records; exit 1 on a regression or missing cases")
    p.add_argument("baseline")
    p.add_argument("current")
    p.add_argument("--threshold", default="2%", help="a percentage (2%%) or a size (256MiB); default 2%%")
    p.add_argument("--out", help="also write the markdown report here")
    p.add_argument("--allow-missing", action="store_true",
                   help="baseline cases missing from the current records do not fail the gate")
    p.add_argument("--error-growth", help="also fail when a case's estimate |error| grows by more than this "
                                          "many points of the measured peak, e.g. 1%%")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("loop", help="profile the embedded quick matrix, calibrate, validate, write the report")
    p.add_argument("--out", default="vramlab-out", help="folder for records, calibration and report")
    p.add_argument("--backend", default="auto", choices=("auto", "cuda", "cpu"))
    _add_wide(p)
    p.set_defaults(func=cmd_loop)
    for command in sub.choices.values():  # --debug after the command works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="on an error, print the traceback too")
        command.epilog = EXIT_CODES
    return parser


#: Exit codes, as ``--help`` and the README state them.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = ("exit codes: 0 done; 1 the command's verdict (compare: a regression; profile, campaign: a failed "
              "case) or an internal error (a bug: one line, --debug shows the traceback); 2 bad input (a flag, "
              "a file, a config: one line naming it); 130 interrupted")
#: An internal error's one line stays short; --debug prints the whole traceback.
INTERNAL_MESSAGE_CHARS = 300


def _one_line(exc: BaseException, limit: int | None = None) -> str:
    """The exception's message on one line (cut at ``limit`` characters, if given)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def _quiet_stdout() -> None:
    """After a closed stdout pipe (``vramlab rules | head -1``): point stdout at /dev/null so
    the interpreter's last flush does not report it again (Python docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no file (captured in tests)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr: bad input (a ``UsageError``,
    ``ValueError``, ``TypeError`` or ``OSError``) exits 2, anything else is an internal
    error and exits 1; ``--debug`` prints the traceback first. Ctrl-C exits 130; a closed
    stdout pipe ends the command quietly."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if sys.stdout is None:  # started with stdout closed (>&-): a file opened now could take its descriptor
        print("vramlab: error: standard output is closed; redirect it to a file or /dev/null (> FILE)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        for warning in getattr(args, "warnings", ()):
            print(f"vramlab: warning: {warning}", file=sys.stderr)
        return code
    except SystemExit as exc:  # --help; sys.exit() in a command
        if isinstance(exc.code, int) or exc.code is None:
            return exc.code or EXIT_OK
        print(f"vramlab: error: {exc.code}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("vramlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK
    except (UsageError, ValueError, TypeError, OSError) as exc:
        if debug:
            traceback.print_exc()
        print(f"vramlab: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            traceback.print_exc()
        print(f"vramlab: internal error: {type(exc).__name__}: {_one_line(exc, INTERNAL_MESSAGE_CHARS)} "
              f"(a bug: rerun with --debug for the traceback and report it)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
