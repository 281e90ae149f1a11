"""``--seq-lengths FILE``: a dataset's example lengths, the batches transformers' Trainer forms
from them, and the batch whose step sets the peak (--trainer sft).

The file is a JSON list of lengths, or text with one example length per line, or ``LENGTH
COUNT`` per line (a histogram); ``#`` starts a comment. ``--seq`` is SFTConfig's
``max_length``: longer examples are cut to it (trl 1.16.0 sft_trainer.py:184-225, the collator's
``truncation``), except under padding-free, where TRL wants ``max_length=None`` (:999-1004) and
nothing is cut.

The shapes, per ``--packing`` (setup.Packing):

- padded (the default with ``--seq-lengths``): each batch right-padded to its longest example,
  so a step is ``(examples in the batch, longest)``; a batch of equal lengths has no padding,
  hence no sdpa mask (transformers 5.24 masking_utils.py:329);
- padding-free: the batch's examples flattened into one row of ``sum(lengths)`` tokens, taken
  here as ``(examples, ceil(sum / examples))``: at most ``examples - 1`` tokens over;
- packed: bins of ``--seq`` tokens whatever the lengths (trl/data_utils.py:730 _pack_bfd), so
  the worst batch is full bins, the estimate at ``--seq``; no order is computed.

The order: ``Trainer._get_train_sampler`` gives a ``RandomSampler`` (transformers 5.24
trainer.py:1071-1090, ``train_sampling_strategy`` "random"), which accelerate replaces by its
``SeedableRandomSampler`` seeded with ``data_seed or seed`` plus the epoch (accelerate 1.16
data_loader.py:77-92; trainer.py:835-839), whose ``__iter__`` is torch's
``randperm(n, generator)`` (torch/utils/data/sampler.py RandomSampler); batches of ``--batch``
examples in that order, the last one shorter (``dataloader_drop_last`` False). Checked against
the batches a real SFTTrainer reads (tests/test_seq_lengths.py). The estimate reports the worst
batch any order can form (the ``--batch`` longest examples together: the safe figure) and the
worst of the seeded order, with its step.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .setup import Packing, Setup, Trainer

#: The most examples a length file may describe (a histogram's counts summed): 100 M, more
#: than any fine-tuning set; the order of that many is a 0.8 GB permutation
MAX_EXAMPLES = 100_000_000
#: The most bytes of a length file read
MAX_FILE_BYTES = 64 * 2**20
#: TrainingArguments.seed's default (transformers 5.24 training_args.py: ``seed: int = 42``)
TRAINER_SEED = 42


def read_lengths(path: str | Path) -> list[int]:
    """The example lengths in ``path`` (module docstring); ValueError in one sentence otherwise."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"--seq-lengths {path}: the file is over {MAX_FILE_BYTES // 2**20} MiB; give a "
                             f"histogram (LENGTH COUNT per line)")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--seq-lengths {path}: cannot read it ({exc.__class__.__name__})") from None
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--seq-lengths {path}: not a JSON list of lengths ({exc.msg} at line {exc.lineno})") \
                from None
        pairs = [(_length(v, path, f"item {i + 1}"), 1) for i, v in enumerate(values)]
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), start=1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) > 2:
                raise ValueError(f"--seq-lengths {path}: line {n} has {len(words)} fields; give LENGTH or "
                                 f"LENGTH COUNT")
            where = f"line {n}"
            count = _length(_int(words[1], path, where), path, where, "count") if len(words) == 2 else 1
            pairs.append((_length(_int(words[0], path, where), path, where), count))
    total = sum(c for _, c in pairs)
    if not total:
        raise ValueError(f"--seq-lengths {path}: no lengths in it")
    if total > MAX_EXAMPLES:
        raise ValueError(f"--seq-lengths {path}: {total:,} examples, over the {MAX_EXAMPLES:,} read")
    return [length for length, count in pairs for _ in range(count)]


def _int(word: str, path: Path, where: str) -> int:
    try:
        return int(word)
    except ValueError:
        raise ValueError(f"--seq-lengths {path}: {where}: {word!r} is not a whole number") from None


def _length(value, path: Path, where: str, what: str = "length") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--seq-lengths {path}: {where}: a {what} is a positive whole number, got {value!r}")
    return value


def trainer_batches(lengths: list[int], batch: int, seed: int = TRAINER_SEED, epoch: int = 0) -> list[list[int]]:
    """The examples' lengths batch by batch, in the order the Trainer reads them in ``epoch``
    (module docstring: ``randperm`` seeded with seed + epoch, batches of ``batch``)."""
    import torch  # the permutation is torch's own (a dependency of vramlab; the rest is torch-free)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    return [[lengths[i] for i in order[k:k + batch]] for k in range(0, len(order), batch)]


def batch_setup(setup: Setup, lengths: list[int]) -> Setup:
    """The setup of one batch of examples of ``lengths`` (module docstring)."""
    b = len(lengths)
    if setup.packing is Packing.PACKED:
        return setup
    if setup.packing is Packing.PADDING_FREE:
        return setup.replace(batch=b, seq=math.ceil(sum(lengths) / b))
    cut = [min(n, setup.seq) for n in lengths]
    return setup.replace(batch=b, seq=max(cut), packing=Packing.PADDED if len(set(cut)) > 1 else None)


@dataclass(frozen=True)
class WorstBatch:
    """The worst batch any order can form (``bound``: the ``--batch`` longest examples) and the
    worst of the Trainer's seeded order in epoch 1 (its ``step``, 1-based optimizer step;
    ``lengths`` its examples), each as the setup of its step; ``steps``: optimizer steps per epoch."""

    examples: int
    steps: int
    bound: Setup
    bound_lengths: tuple[int, ...]
    worst: Setup | None
    lengths: tuple[int, ...]
    step: int | None
    seed: int

    def to_dict(self) -> dict:
        return {"examples": self.examples, "steps_per_epoch": self.steps, "seed": self.seed,
                "bound": {"batch": self.bound.batch, "seq": self.bound.seq, "lengths": list(self.bound_lengths)},
                "seeded_worst": None if self.step is None else
                {"step": self.step, "batch": self.worst.batch, "seq": self.worst.seq, "lengths": list(self.lengths)}}


def check_lengths_setup(setup: Setup) -> None:
    if setup.trainer is not Trainer.SFT:
        raise ValueError(f"--seq-lengths lays examples out as SFTTrainer's collator does; pass --trainer sft "
                         f"(got --trainer {setup.trainer})")
    if setup.grad_accum != 1 or setup.world_size != 1:
        raise ValueError("--seq-lengths reads the order of one device's micro-batches, one per step: leave "
                         "--grad-accum and --world-size at 1")


def worst_batch(setup: Setup, lengths: list[int], peak, seed: int = TRAINER_SEED) -> WorstBatch:
    """``peak(setup) -> bytes`` ranks the batches (the estimate's total). ``setup.packing`` None
    reads as padded: variable-length examples are padded by SFTTrainer's collator."""
    check_lengths_setup(setup)
    if setup.packing is None:
        setup = setup.replace(packing=Packing.PADDED)
    b = setup.batch
    steps = math.ceil(len(lengths) / b)
    if setup.packing is Packing.PACKED:
        return WorstBatch(len(lengths), steps, setup, (), None, (), None, seed)
    longest = tuple(sorted(lengths, reverse=True)[:b])
    bound = batch_setup(setup, list(longest))
    cache: dict[tuple[int, int, object], int] = {}

    def cost(s: Setup) -> int:
        key = (s.batch, s.seq, s.packing)
        if key not in cache:
            cache[key] = peak(s)
        return cache[key]

    batches = trainer_batches(lengths, b, seed)
    costs = [cost(batch_setup(setup, one)) for one in batches]
    k = max(range(len(batches)), key=lambda i: (costs[i], -i))
    return WorstBatch(len(lengths), steps, bound, longest, batch_setup(setup, batches[k]), tuple(batches[k]), k + 1,
                      seed)
