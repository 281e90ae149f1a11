"""The setup flags, one definition for every command that takes a setup."""
from __future__ import annotations

import argparse

from .setup import (
    DEFAULT_LORA_TARGETS,
    Attention,
    Device,
    Loop,
    Loss,
    Mode,
    Optimizer,
    OptimizerImpl,
    Precision,
    Quant,
    Setup,
    Sharding,
)
from .versions import parse_overrides


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("setup")
    choices = lambda enum: ", ".join(m.value for m in enum)  # noqa: E731
    g.add_argument("--mode", default="full", help=f"{choices(Mode)} (default full)")
    g.add_argument("--precision", default="bf16", help=f"{choices(Precision)} (default bf16)")
    g.add_argument("--quant", default="none", help=f"{choices(Quant)} (inference, qlora)")
    g.add_argument("--optimizer", default="adamw", help=f"{choices(Optimizer)} (default adamw; none: "
                                                        f"forward and backward only, gradients freed before the next)")
    g.add_argument("--optimizer-impl", default="auto", help=f"{choices(OptimizerImpl)} (default: as torch picks)")
    g.add_argument("--batch", default="1", help="micro-batch size per device (default 1)")
    g.add_argument("--seq", default="512", help="sequence length in tokens (default 512)")
    g.add_argument("--new-tokens", default="0", help="inference: tokens decoded after the prompt (default 0)")
    g.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing per decoder layer")
    g.add_argument("--attn", default="sdpa", help=f"{choices(Attention)} (default sdpa)")
    g.add_argument("--lora-rank", default="16", help="LoRA rank r (default 16)")
    g.add_argument("--lora-alpha", default=None, help="LoRA alpha (default 2r)")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                   help="comma list of module names, or all-linear (default q_proj,v_proj)")
    g.add_argument("--device", default="cuda", help=f"{choices(Device)} semantics (default cuda)")
    g.add_argument("--world-size", default="1", help="number of data-parallel ranks (default 1)")
    g.add_argument("--sharding", default="none", help=f"{choices(Sharding)} (default none)")
    g.add_argument("--loop", default="trainer", help=f"{choices(Loop)}: manual keeps the outputs through "
                                                     f"backward (default trainer)")
    g.add_argument("--grad-accum", default="1", help="micro-batches per optimizer step (default 1)")
    g.add_argument("--keep-grads", action="store_true", help="zero_grad(set_to_none=False): gradients stay")
    g.add_argument("--use-cache", action="store_true", help="training/eval forward builds a KV cache")
    g.add_argument("--loss", default="causal-lm", help=f"{choices(Loss)}: logits-sum is loss = logits.sum() "
                                                       f"(no fp32 upcast, no log-softmax; default causal-lm)")
    g.add_argument("--versions", default="", help="library versions whose memory semantics to assume, e.g. "
                                                  "transformers=4.48,torch=2.4 (default: the installed ones)")


def _int(name: str, text) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise ValueError(f"--{name} must be an integer, got {text!r}") from None


def setup_from_args(args: argparse.Namespace) -> Setup:
    """Build a validated Setup; raises ValueError with a one-sentence message."""
    return Setup(
        mode=args.mode, precision=args.precision, quant=args.quant, optimizer=args.optimizer,
        optimizer_impl=args.optimizer_impl, batch=_int("batch", args.batch), seq=_int("seq", args.seq),
        new_tokens=_int("new-tokens", args.new_tokens), grad_ckpt=bool(args.grad_ckpt), attn=args.attn,
        lora_rank=_int("lora-rank", args.lora_rank),
        lora_alpha=None if args.lora_alpha is None else _int("lora-alpha", args.lora_alpha),
        lora_targets=args.lora_targets, device=args.device,
        world_size=_int("world-size", args.world_size), sharding=args.sharding, loop=args.loop,
        grad_accum=_int("grad-accum", args.grad_accum), keep_grads=bool(args.keep_grads),
        use_cache=bool(args.use_cache), loss=getattr(args, "loss", "causal-lm"),
        versions=parse_overrides(getattr(args, "versions", "") or ""))
