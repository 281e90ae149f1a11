"""The setup flags, one definition for every command that takes a setup."""
from __future__ import annotations

import argparse
import textwrap

from .allocator import ALLOC_CONF_KEYS
from .setup import (
    DEFAULT_LORA_TARGETS,
    Attention,
    Device,
    FsdpWrap,
    KbitPrep,
    Load,
    Loop,
    Loss,
    Mode,
    Optimizer,
    OptimizerImpl,
    Packing,
    Precision,
    Quant,
    RefModel,
    Setup,
    Sharding,
    Trainer,
)
from .trainers import trainer_defaults
from .versions import parse_overrides


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a description's lines that start with two spaces
    stay lines (the precision recipes), each wrapped with a hanging indent."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for line in text.split("\n"):
            if line.startswith("  "):
                out.append(textwrap.fill(line.strip(), width, initial_indent=indent + "  ",
                                         subsequent_indent=indent + " " * RECIPE_HANG))
            else:
                out.append(super()._fill_text(line, width, indent))
        return "\n".join(out)


#: Where a recipe's text starts in ``--help``: after the longest name ("mixed-bf16") and two spaces
RECIPE_HANG = 2 + max(len(p.value) for p in Precision) + 2


def recipes_help() -> str:
    """``--help``'s table of precision recipes, from the enum's own definitions."""
    return "\n".join(f"  {p.value:<{RECIPE_HANG - 3}} {p.recipe}. Comes from: {p.comes_from}." for p in Precision)


def recipes_markdown() -> str:
    """The README's table of precision recipes, from the same definitions."""
    rows = [f"| `{p.value}` | {p.recipe} | {p.comes_from} |" for p in Precision]
    return "\n".join(["| `--precision` | weights, gradients, optimizer state, compute | what gives it |",
                      "|---|---|---|", *rows])


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    g = parser.add_argument_group("setup")
    choices = lambda enum: ", ".join(m.value for m in enum)  # noqa: E731
    g.add_argument("--mode", default="full", help=f"{choices(Mode)} (default full)")
    g.add_argument("--precision", default="bf16", help=f"{choices(Precision)} (default bf16: pure bf16; each "
                                                       f"recipe below, under 'precision recipes')")
    g.add_argument("--quant", default="none", help=f"{choices(Quant)} (inference, qlora)")
    g.add_argument("--kbit-prep", default="auto", help=f"{choices(KbitPrep)}: qlora's preparation; peft is "
                                                       f"peft's prepare_model_for_kbit_training (unquantized "
                                                       f"parameters, the stream and the logits fp32), none keeps "
                                                       f"the loaded dtypes (default auto: peft on one device, "
                                                       f"none under FSDP and ZeRO-3, as TRL)")
    g.add_argument("--optimizer", default=None, help=f"{choices(Optimizer)} (default adamw; none: forward and "
                                                      f"backward only, gradients freed before the next; training only)")
    g.add_argument("--optimizer-impl", default=None,
                   help=f"{choices(OptimizerImpl)} (default: as torch picks; training only)")
    g.add_argument("--batch", default="1", help="micro-batch size per device (default 1)")
    g.add_argument("--seq", default="512", help="sequence length in tokens (default 512)")
    g.add_argument("--new-tokens", default=None, help="inference: tokens decoded after the prompt (default 0)")
    g.add_argument("--grad-ckpt", action="store_true", default=None,
                   help="gradient checkpointing per decoder layer (training; --trainer sft: on by default)")
    g.add_argument("--no-grad-ckpt", action="store_false", dest="grad_ckpt",
                   help="no gradient checkpointing (what --trainer sft turns on by default)")
    g.add_argument("--attn", default="sdpa", help=f"{choices(Attention)} (default sdpa; flash: CUDA, 16-bit)")
    g.add_argument("--lora-rank", default="16", help="LoRA rank r (default 16)")
    g.add_argument("--lora-alpha", default=None, help="LoRA alpha (default 2r)")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_LORA_TARGETS),
                   help="comma list of module names, or all-linear (default q_proj,v_proj)")
    g.add_argument("--device", default="cuda", help=f"{choices(Device)} semantics (default cuda)")
    g.add_argument("--world-size", default="1", help="number of data-parallel ranks (default 1)")
    g.add_argument("--sharding", default="none", help=f"{choices(Sharding)} (default none)")
    g.add_argument("--fsdp-wrap", default="peft", help=f"{choices(FsdpWrap)}: FSDP1's units for a LoRA model; "
                                                       f"peft is peft's fsdp_auto_wrap_policy (each adapter a unit, "
                                                       f"what the Trainer installs), layers one unit per decoder "
                                                       f"layer only (gradients and saved inputs for the frozen "
                                                       f"weights too; default peft)")
    g.add_argument("--loop", default="trainer", help=f"{choices(Loop)}: manual keeps the outputs through "
                                                     f"backward (default trainer)")
    g.add_argument("--grad-accum", default="1", help="micro-batches per optimizer step (default 1)")
    g.add_argument("--keep-grads", action="store_true", help="zero_grad(set_to_none=False): gradients stay")
    g.add_argument("--use-cache", action="store_true", help="training/eval forward builds a KV cache")
    g.add_argument("--loss", default=None, help=f"{choices(Loss)}: logits-sum is loss = logits.sum() "
                                                f"(no fp32 upcast, no log-softmax); none (--mode eval) a forward "
                                                f"without labels, logits only; chunked-nll TRL's fused LM head "
                                                f"(--trainer sft) (default causal-lm; --trainer sft: chunked-nll "
                                                f"from trl 1.7)")
    g.add_argument("--trainer", default="hf", help=f"{choices(Trainer)}: sft is TRL's SFTTrainer with its "
                                                   f"defaults (loss, checkpointing) for the assumed trl version; "
                                                   f"dpo TRL's DPOTrainer (chosen + rejected, a reference); "
                                                   f"grpo TRL's GRPOTrainer (model.generate, then training on "
                                                   f"prompt + completion; colocated vLLM not modelled) "
                                                   f"(default hf: transformers.Trainer or the --loop)")
    g.add_argument("--ref-model", default=None, help=f"--trainer dpo: {choices(RefModel)}: a second frozen copy, "
                                                     f"the LoRA policy with its adapter disabled, or reference "
                                                     f"log-probs computed before training (default: adapter with "
                                                     f"LoRA / QLoRA, separate otherwise, as TRL)")
    g.add_argument("--packing", default=None, help=f"--trainer sft: {choices(Packing)}: rows padded to the "
                                                   f"batch's longest (--seq), TRL's packing into --seq-token bins "
                                                   f"flattened into one row, or the batch's examples (mean length "
                                                   f"--seq) flattened into one row (default: rows of equal length)")
    g.add_argument("--completion-only", default=None, metavar="TOKENS",
                   help="--trainer sft: the loss on the last TOKENS of each --seq-token sequence, the rest the "
                        "prompt (SFTConfig.completion_only_loss on a prompt-completion dataset); --trainer dpo: "
                        "each response's tokens (chosen and rejected alike), the rest of --seq the prompt; on CUDA "
                        "the fused head scores those rows only (default: every token labelled, for DPO a one-token "
                        "prompt: the bound)")
    g.add_argument("--num-generations", default=None, help="--trainer grpo: completions sampled per prompt "
                                                           "(GRPOConfig.num_generations, default 8); --batch counts "
                                                           "completions, --seq the prompt's tokens")
    g.add_argument("--max-completion", default=None, help="--trainer grpo: tokens generated per completion "
                                                          "(GRPOConfig.max_completion_length, default 512; the "
                                                          "estimate takes every completion at this length)")
    g.add_argument("--num-iterations", default=None, help="--trainer grpo: optimizer passes per generation batch "
                                                          "(GRPOConfig.num_iterations, default 1); above 1 a no-grad "
                                                          "log-prob pass follows generation (the logprob phase)")
    g.add_argument("--beta", default=None, help="--trainer grpo: the KL coefficient (GRPOConfig.beta, default 0.0); "
                                                "not 0: a reference (the LoRA policy's adapter disabled, or a "
                                                "frozen copy under full fine-tuning) and its no-grad log-prob pass")
    g.add_argument("--rope-scaling", default=None, metavar="FACTOR",
                   help="stretch rotary positions by FACTOR: sequences up to FACTOR x max_position_embeddings "
                        "(default: the config's rope scaling)")
    g.add_argument("--allow-llama-fallback", action="store_true",
                   help="estimate a model type outside the registry with the Llama-style terms (refused "
                        "otherwise; measure it with `vramlab profile MODEL --backend sim` instead)")
    g.add_argument("--versions", default="", help="library versions whose memory semantics to assume, e.g. "
                                                  "transformers=4.48,torch=2.4 (default: the installed ones)")
    g.add_argument("--alloc-conf", default="", help=f"PYTORCH_CUDA_ALLOC_CONF as the run sets it ("
                                                    f"{', '.join(ALLOC_CONF_KEYS)}), e.g. "
                                                    f"expandable_segments:True (default: torch's)")
    g.add_argument("--empty-cache-steps", default="0", help="torch.cuda.empty_cache() every N optimizer steps "
                                                            "(TrainingArguments torch_empty_cache_steps; default 0: "
                                                            "never)")
    g.add_argument("--load", default="pretrained", help=f"{choices(Load)}: how the weights reach the device "
                                                        f"(config: from_config built on it; default pretrained)")
    parser.add_argument_group("precision recipes (--precision)", "What each recipe types how, and which "
                              "training code runs it (the model's dtype decides first, then autocast):\n"
                              + recipes_help())


def _int(name: str, text) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise ValueError(f"--{name} must be an integer, got {text!r}") from None


def _optional_int(name: str, text) -> int | None:
    return None if text is None else _int(name, text)


def _optional_float(name: str, text) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--{name} must be a number, got {text!r}") from None


def _factor(name: str, text) -> float:
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--{name} must be a number, got {text!r}") from None
    return value


def setup_from_args(args: argparse.Namespace, device: str | None = None) -> Setup:
    """Build a validated Setup; raises ValueError with a one-sentence message, also for flags
    that contradict each other (:func:`check_flags`). ``device`` overrides ``--device``
    where the command decides it (``profile --backend cpu`` runs CPU semantics). Flags that
    do not apply to the mode (:func:`flag_warnings`) are left out of the Setup."""
    versions = parse_overrides(getattr(args, "versions", "") or "")
    trainer = getattr(args, "trainer", "hf") or "hf"
    defaults = trainer_defaults(trainer, tuple(sorted(versions.items())))
    loss = getattr(args, "loss", None)
    grad_ckpt = args.grad_ckpt
    setup = Setup(
        mode=args.mode, precision=args.precision, quant=args.quant, optimizer=args.optimizer or "adamw",
        optimizer_impl=args.optimizer_impl or "auto", batch=_int("batch", args.batch), seq=_int("seq", args.seq),
        new_tokens=_int("new-tokens", args.new_tokens or 0),
        grad_ckpt=bool(defaults.get("grad_ckpt", False) if grad_ckpt is None else grad_ckpt), attn=args.attn,
        lora_rank=_int("lora-rank", args.lora_rank),
        lora_alpha=None if args.lora_alpha is None else _int("lora-alpha", args.lora_alpha),
        lora_targets=args.lora_targets, device=device or args.device,
        world_size=_int("world-size", args.world_size), sharding=args.sharding, loop=args.loop,
        grad_accum=_int("grad-accum", args.grad_accum), keep_grads=bool(args.keep_grads),
        use_cache=bool(args.use_cache), loss=loss or defaults.get("loss", "causal-lm"), trainer=trainer,
        ref_model=getattr(args, "ref_model", None), packing=getattr(args, "packing", None),
        num_generations=_optional_int("num-generations", getattr(args, "num_generations", None)),
        max_completion=_optional_int("max-completion", getattr(args, "max_completion", None)),
        num_iterations=_optional_int("num-iterations", getattr(args, "num_iterations", None)),
        beta=_optional_float("beta", getattr(args, "beta", None)),
        completion_only=_optional_int("completion-only", getattr(args, "completion_only", None)),
        versions=versions,
        allow_llama_fallback=bool(getattr(args, "allow_llama_fallback", False)),
        alloc_conf=getattr(args, "alloc_conf", "") or "",
        empty_cache_steps=_int("empty-cache-steps", getattr(args, "empty_cache_steps", 0) or 0),
        load=getattr(args, "load", "pretrained") or "pretrained",
        kbit_prep=getattr(args, "kbit_prep", "auto") or "auto",
        fsdp_wrap=getattr(args, "fsdp_wrap", "peft") or "peft",
        rope_scaling=_factor("rope-scaling", getattr(args, "rope_scaling", None)))
    check_flags(setup)
    if not setup.training:  # what flag_warnings says is ignored
        setup = setup.replace(grad_ckpt=False, optimizer=Optimizer.ADAMW, optimizer_impl=OptimizerImpl.AUTO)
    return setup


def check_flags(setup: Setup) -> None:
    """Flags that contradict each other: a ValueError naming both."""
    if setup.new_tokens and setup.mode is not Mode.INFERENCE:
        raise ValueError(f"--new-tokens {setup.new_tokens} applies to --mode inference (tokens decoded after the "
                         f"prompt); --mode {setup.mode} runs on --seq tokens and decodes none")
    if setup.attn is Attention.FLASH and setup.device is Device.CPU:
        # flash-attn's kernels are CUDA only (Dao-AILab/flash-attention README: "Requirements: CUDA")
        raise ValueError("--attn flash (FlashAttention-2) runs on CUDA only; on the cpu device use --attn sdpa "
                         "or eager")
    if setup.attn is Attention.FLASH and setup.precision is Precision.FP32:
        # flash-attn takes fp16 and bf16 inputs only (README: "Datatype fp16 and bf16"); under
        # autocast (amp-*) the attention inputs are 16-bit
        raise ValueError("--attn flash needs 16-bit attention inputs (FlashAttention-2 takes fp16 and bf16 "
                         "only); with --precision fp32 use --attn sdpa or eager, or pick bf16 or amp-bf16")


def flag_warnings(args: argparse.Namespace) -> list[str]:
    """Flags given that the mode ignores, one sentence each (the Setup leaves them out)."""
    mode = Mode.parse(args.mode)
    if mode not in (Mode.INFERENCE, Mode.EVAL):
        return []
    given = [flag for flag, value in (("--grad-ckpt", args.grad_ckpt), ("--optimizer", args.optimizer),
                                      ("--optimizer-impl", args.optimizer_impl)) if value]
    return [f"{flag} has no effect with --mode {mode} (no backward, no optimizer step); ignored" for flag in given]
