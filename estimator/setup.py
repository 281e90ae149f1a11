"""The setup of a run: typed, validated, frozen.

Enums for closed sets and validation in ``__post_init__`` (the llm-analysis habit);
every invalid value is a ``ValueError`` naming the value and the valid choices.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from enum import Enum
from functools import lru_cache
from typing import TypeVar

from .allocator import AllocConf
from .units import FP32, HALF
from .versions import LIBRARIES, Semantics, parse_version, semantics_for

E = TypeVar("E", bound=Enum)


class _Choice(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls: type[E], value: str | E) -> E:
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower().replace("_", "-")
        text = _ALIASES.get(cls.__name__, {}).get(text, text)
        for member in cls:  # type: ignore[attr-defined]
            if member.value == text:
                return member
        valid = ", ".join(m.value for m in cls)  # type: ignore[attr-defined]
        raise ValueError(f"unknown {cls.__name__.lower()} {value!r}; choose one of: {valid}")


class Mode(_Choice):
    INFERENCE = "inference"  # generate: a prefill with logits_to_keep=1, then decode steps
    EVAL = "eval"  # one forward under no_grad with full logits and the loss (perplexity), or none (--loss none)
    FULL = "full"  # full training / full fine-tuning: every parameter trainable
    LORA = "lora"
    QLORA = "qlora"


class Loop(_Choice):
    """How a training step holds the model's outputs (transformers' no_trainer examples and
    PEFT's: ``out = model(**batch); out.loss.backward()``)."""

    TRAINER = "trainer"  # transformers.Trainer: compute_loss returns the loss, outputs dropped before backward
    MANUAL = "manual"  # a hand-written loop: the outputs (logits, a cache) alive until after backward
    # a hand-written loop that only rebinds ``out = model(**batch)`` at the next step: the
    # outputs live through backward, the optimizer step and the next forward until it returns
    HELD = "held"


class Loss(_Choice):
    """What backward starts from."""

    # transformers' causal-LM loss (model(ids, labels=ids)): fp32 logits, log-softmax saved
    CAUSAL_LM = "causal-lm"
    # loss = out.logits.sum(): no upcast, nothing saved; backward starts from a ones-like
    # gradient of the logits (the transformers model_doc SDPA training benchmarks)
    LOGITS_SUM = "logits-sum"
    # no loss at all: ``model(input_ids)`` without labels returns the logits only, as reward
    # scoring and DPO's reference pass run it (--mode eval); nothing to start a backward from
    NONE = "none"
    # TRL's SFTTrainer loss (trl >= 1.7's default, estimator/trainers.py): per-token log-probs
    # from the LM head's weight in [4096 tokens x 32768 vocabulary] tiles, never the full
    # (b, s, V) logits (trl 1.16.0 trl/trainer/utils.py:1548 add_fused_lm_head,
    # trl/kernels/chunked_logprob.py:299 ChunkedLogProbFunction); --trainer sft only
    CHUNKED_NLL = "chunked-nll"


class Trainer(_Choice):
    """Which trainer drives the step (its defaults and its loss path; estimator/trainers.py)."""

    # transformers.Trainer, or the hand-written loop --loop names
    HF = "hf"
    # TRL's SFTTrainer: a transformers.Trainer whose compute_loss runs its own loss
    # (trl 1.16.0 trl/trainer/sft_trainer.py:1560); defaults per trl version (trainers.py)
    SFT = "sft"
    # TRL's DPOTrainer: chosen and rejected in one policy forward (2 x batch sequences, fused LM
    # head) and a no-grad reference forward after it (trl 1.16.0 trl/trainer/dpo_trainer.py:1285
    # _compute_loss; --ref-model, estimator/trainers.py)
    DPO = "dpo"
    # TRL's GRPOTrainer: model.generate of num_generations completions per prompt, then the
    # policy's forward / backward on prompt + completion with the fused LM head (trl 1.16.0
    # trl/trainer/grpo_trainer.py:1522 _prepare_inputs, :3020 _compute_loss; estimator/grpo.py)
    GRPO = "grpo"


class RefModel(_Choice):
    """Where DPO's reference log-probs come from (--trainer dpo; trl 1.16.0 dpo_trainer.py:907-930)."""

    # a second, frozen copy of the model on the device: TRL's default without peft
    # (dpo_trainer.py:915-927 builds one from the policy's config and dtype), or a ref_model passed in
    SEPARATE = "separate"
    # LoRA / QLoRA: the policy itself with its adapter disabled (use_adapter(model, None),
    # dpo_trainer.py:1328-1336), no second copy: TRL's default with peft (:909-914)
    ADAPTER = "adapter"
    # precompute_ref_log_probs=True: the reference log-probs computed over the dataset before
    # training (:1013-1018 _precompute_ref_logps) and read from the batch (:1318-1319): no
    # reference forward in the step and, without a ref_model passed, no reference copy (:909)
    PRECOMPUTED = "precomputed"


class Packing(_Choice):
    """How SFTTrainer lays variable-length examples out in a batch (--trainer sft; trl 1.16.0).

    Left out (``Setup.packing`` None): rows of equal length, no padding -- the synthetic batch
    every other setup runs."""

    # packing=False, padding_free=False: DataCollatorForLanguageModeling right-pads each row to
    # the batch's longest and returns the attention_mask (trl/trainer/sft_trainer.py:184-225), so
    # the step is (batch, seq) with seq the longest; a shorter row's zeros keep transformers'
    # sdpa mask (masking_utils.py:329 ``padding_mask.all()``): every sdpa layer gets a mask
    PADDED = "padded"
    # packing=True with the default packing_strategy "bfd" (sft_config.py:229-236): examples
    # packed into bins of max_length tokens (trl/data_utils.py:730 _pack_bfd), which turns
    # padding-free on (sft_trainer.py:916): the batch's bins flattened into one row of
    # batch x max_length tokens with position_ids restarting per example (:187-212)
    PACKED = "packed"
    # padding_free=True without packing: the batch's examples flattened into one row of
    # sum(lengths) tokens with position_ids (sft_trainer.py:187-212); TRL needs max_length=None
    # then (:999-1004), so --seq is the examples' mean length (the row holds batch x seq tokens)
    PADDING_FREE = "padding-free"

    @property
    def flattened(self) -> bool:
        """One (1, batch x seq) row with position_ids: transformers finds the packed sequences
        (masking_utils.py:735-764 find_packed_sequence_indices) and builds a block-diagonal
        mask for sdpa and eager (:991-1002, ``allow_is_causal_skip = False``)."""
        return self in (Packing.PACKED, Packing.PADDING_FREE)


class Precision(_Choice):
    """Precision recipe: how weights, compute, gradients and optimizer state are typed.

    The one definition of each recipe: :attr:`recipe` says what it types how and
    :attr:`comes_from` which training code gives it; ``--help``, the README's table and every
    output line that names a precision read them from here.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    AMP_FP16 = "amp-fp16"
    AMP_BF16 = "amp-bf16"
    MIXED_BF16 = "mixed-bf16"

    @property
    def recipe(self) -> str:
        """What the recipe types how, in one line. torch.optim keeps AdamW's exp_avg and
        exp_avg_sq in the parameter's dtype (``zeros_like(p)``, torch/optim/adamw.py);
        torch.autocast casts matmul inputs and caches the weight casts for the forward and
        backward (aten/src/ATen/autocast_mode.cpp ``cached_cast``); mixed-bf16 is ZeRO's
        mixed-precision Adam (Rajbhandari et al. 2019, Sec. 3) with bf16 in place of fp16."""
        return {
            Precision.FP32: "fp32 weights, gradients, optimizer state and compute",
            Precision.FP16: "pure fp16: weights, gradients, optimizer state and compute fp16",
            Precision.BF16: "pure bf16: weights, gradients, optimizer state and compute bf16",
            Precision.AMP_FP16: "fp32 weights, gradients and optimizer state; matmuls fp16 under autocast",
            Precision.AMP_BF16: "fp32 weights, gradients and optimizer state; matmuls bf16 under autocast",
            Precision.MIXED_BF16: "bf16 weights and gradients; fp32 master weights and optimizer state",
        }[self]

    @property
    def comes_from(self) -> str:
        """Which training code gives the recipe. The model's dtype decides first:
        transformers 5's ``from_pretrained`` defaults to ``dtype="auto"``, the checkpoint's
        own dtype (modeling_utils.py: ``if dtype is None: dtype = "auto"``; bf16 for most
        Llama, Mistral, Qwen and Gemma checkpoints), transformers 4's to fp32. The Trainer's
        ``bf16``/``fp16`` (accelerate ``mixed_precision``) then runs the forward under
        ``torch.autocast`` (accelerate/accelerator.py ``prepare_model``), which over bf16
        weights leaves weights and matmuls in bf16 (only its fp32-list ops, softmax, pow,
        norms, run in fp32): bf16 is the nearest recipe. TRL's ``SFTTrainer("model-id")`` loads with
        ``dtype="auto"`` (trl ``create_model_from_path``) and ``SFTConfig`` sets ``bf16=True``
        unless ``fp16`` (trl/trainer/sft_config.py). DeepSpeed's ``"bf16": {"enabled": true}``
        keeps fp32 master weights and optimizer state in its ZeRO optimizer."""
        return {
            Precision.FP32: "Trainer without bf16/fp16 on an fp32-loaded model (transformers 4's default load)",
            Precision.FP16: "a model loaded with dtype=torch.float16 and trained without autocast",
            Precision.BF16: "a bf16-loaded model (dtype=torch.bfloat16, or transformers 5's default "
                            "dtype=\"auto\" on a bf16 checkpoint) under the Trainer, bf16=True or not; "
                            "TRL's SFTTrainer defaults",
            Precision.AMP_FP16: "Trainer fp16=True (accelerate mixed_precision=\"fp16\") on an fp32-loaded model",
            Precision.AMP_BF16: "Trainer bf16=True (accelerate mixed_precision=\"bf16\") on an fp32-loaded "
                                "model (transformers 4's default load, or dtype=torch.float32)",
            Precision.MIXED_BF16: "DeepSpeed ZeRO with bf16 enabled; ZeRO's 16 bytes/param",
        }[self]

    @property
    def param_bytes(self) -> int:
        """Bytes per element of the model's parameters as they sit on the device."""
        return FP32 if self in (Precision.FP32, Precision.AMP_FP16, Precision.AMP_BF16) else HALF

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of matmul outputs / most activations."""
        return FP32 if self is Precision.FP32 else HALF

    @property
    def is_autocast(self) -> bool:
        return self in (Precision.AMP_FP16, Precision.AMP_BF16)

    @property
    def torch_dtype_name(self) -> str:
        """The dtype of the parameters (``torch.<name>``)."""
        return {Precision.FP16: "float16", Precision.BF16: "bfloat16",
                Precision.MIXED_BF16: "bfloat16"}.get(self, "float32")

    @property
    def compute_dtype_name(self) -> str:
        return {Precision.FP32: "float32", Precision.FP16: "float16",
                Precision.AMP_FP16: "float16"}.get(self, "bfloat16")


class Quant(_Choice):
    """Weight quantization of the base model (inference and QLoRA)."""

    NONE = "none"
    INT8 = "int8"  # LLM.int8 (bitsandbytes Linear8bitLt)
    NF4 = "nf4"  # QLoRA 4-bit NormalFloat
    NF4_DQ = "nf4-dq"  # NF4 with double quantization of the absmax constants
    FP4 = "fp4"  # bitsandbytes' 4-bit float (bnb_4bit_quant_type="fp4"): NF4's bytes, another code


class KbitPrep(_Choice):
    """How a k-bit quantized model is prepared for training (``--mode qlora``).

    PEFT: peft's ``prepare_model_for_kbit_training`` (peft 0.21 utils/other.py:204-209: every
    fp16/bf16 parameter that is not ``Params4bit`` cast to fp32 -- the embeddings, norms,
    LM head and the quantized linears' biases -- so the residual stream, attention and the
    logits run in fp32 wherever autocast does not cast them; :attr:`Setup.stream_precision`).
    What PEFT's QLoRA recipe and TRL's SFTTrainer (0.19.1 trainer/sft_trainer.py:568-584)
    run on one device. NONE: no preparation (the loaded dtypes stay): TRL under FSDP or
    ZeRO-3 (``is_sharded_qlora``, sft_trainer.py:571-576: packed weights on cpu or meta
    skip the preparation), TRL 1.x's SFTTrainer (1.13.0 trainer/sft_trainer.py:1150-1156
    calls no preparation; it casts the adapters to bf16, which is not modelled here) and
    trainers with their own. AUTO (the default): PEFT for QLoRA on one device or under
    DDP, ZeRO-1/2; NONE under FSDP and ZeRO-3, as TRL decides. peft's own default also
    turns on gradient checkpointing (``use_gradient_checkpointing=True`` since peft 0.3); TRL
    passes ``args.gradient_checkpointing``, here ``--grad-ckpt``. What peft releases cast
    differently is a version row (estimator/versions.py ``kbit_prep_casts_packed_storage``)."""

    AUTO = "auto"
    PEFT = "peft"
    NONE = "none"


class FsdpWrap(_Choice):
    """How FSDP1 (``--sharding fsdp1``, ``fsdp1-shard-grad-op``) divides a LoRA model into units.

    PEFT (the default): peft's ``fsdp_auto_wrap_policy`` (peft 0.21 utils/other.py:1271-1308:
    every leaf module with a trainable weight -- each adapter's lora_A and lora_B -- a unit of
    its own, or-ed with one unit per decoder layer), what the Trainer installs for a peft model
    since transformers 4.40 (PR #29587 ``_fsdp_qlora_plugin_updates``; 5.24
    distributed/fsdp.py:267-279 ``update_fsdp_plugin_peft``). LAYERS: one unit per decoder
    layer only (accelerate's TRANSFORMER_BASED_WRAP in a loop of one's own, the Trainer before
    4.40): a layer's flat parameter then holds its frozen weights and its adapters, and with
    ``use_orig_params=True`` FSDP allocates gradient memory for the whole flat parameter
    (torch 2.13 distributed/fsdp/fully_sharded_data_parallel.py:208-213: mixing frozen and
    non-frozen parameters in one instance gives "higher than expected gradient memory
    usage") and the unsharded views it hands the layer's modules require gradients, so every
    base linear and norm saves what full training saves (measured: results/distributed).
    The flat parameter needs one dtype (_flat_param.py:814: "Must flatten tensors with
    uniform dtype"), so the weights must share the adapters' fp32 (fp32 or an fp32-loaded
    amp recipe)."""

    PEFT = "peft"
    LAYERS = "layers"


class Optimizer(_Choice):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw-8bit"
    # bitsandbytes PagedAdamW8bit: AdamW8bit's state, the buffers of tensors of at least 1e5
    # values in CUDA unified memory (bitsandbytes 0.50.2 optim/optimizer.py:374-390
    # get_state_buffer, functional.py:91-99 get_paged: cudaMallocManaged), which the caching
    # allocator does not count and the driver may page out to host memory; on CPU it is
    # AdamW8bit ("Paged optimizers are not supported on CPU", :375-382)
    PAGED_ADAMW_8BIT = "paged-adamw-8bit"
    SGD = "sgd"
    SGD_MOMENTUM = "sgd-momentum"
    ADAFACTOR = "adafactor"
    # no optimizer step: forward and backward only; the gradients are freed
    # (zero_grad(set_to_none=True)) before the next forward (fxmarty's SDPA training benchmark)
    NONE = "none"

    @property
    def bitsandbytes(self) -> bool:
        """bitsandbytes' 8-bit optimizers (blockwise-quantized state, Dettmers et al. 2022)."""
        return self in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT)


class OptimizerImpl(_Choice):
    """torch.optim implementation; AUTO is what torch picks on the device
    (``torch/optim/optimizer.py::_default_to_fused_or_foreach``: foreach when every
    parameter is a CUDA tensor, the for-loop otherwise; fused is never the default)."""

    AUTO = "auto"
    FOREACH = "foreach"
    FUSED = "fused"
    FORLOOP = "for-loop"


class Attention(_Choice):
    EAGER = "eager"
    SDPA = "sdpa"
    FLASH = "flash"  # flash_attention_2


class Load(_Choice):
    """How the model's weights reach the device, before the first step."""

    # from_pretrained (then .to(device), or a device_map): every tensor placed once, a tied
    # head once; a checkpoint stored in another dtype is converted on the host (a blocking
    # CPU-to-GPU copy converts before it copies: aten/src/ATen/native/cuda/Copy.cu
    # copy_kernel_cuda, "type conversions are performed on the CPU"); bitsandbytes quantizes
    # on the device from a 16-bit copy of each weight
    PRETRAINED = "pretrained"
    # from_config built on the device (``with torch.device("cuda")``, the profiler's harness):
    # the LM head's own weight is made with the module and dropped when tie_weights() ties it
    # (transformers PreTrainedModel.post_init -> tie_weights), a cached block of its size
    CONFIG = "config"


class Device(_Choice):
    CUDA = "cuda"
    CPU = "cpu"


class Sharding(_Choice):
    NONE = "none"
    DDP = "ddp"
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    ZERO3 = "zero3"
    FSDP = "fsdp"  # FSDP2 fully_shard: parameters, gradients and states sharded (like ZeRO-3)
    FSDP1 = "fsdp1"  # FSDP1 (accelerate's FSDP): flat parameters per wrapped layer, FULL_SHARD
    FSDP1_GRAD_OP = "fsdp1-shard-grad-op"  # FSDP1 SHARD_GRAD_OP: parameters kept unsharded from forward to backward


#: Other names users write for a choice (the value kept in records is the canonical one).
_ALIASES = {"Sharding": {"fsdp2": "fsdp", "fsdp1-full-shard": "fsdp1", "fsdp1-grad-op": "fsdp1-shard-grad-op"}}

#: Normalised setups (Setup.shape_free / per_sequence), one object per distinct key,
#: found by the fields a normalised setup keeps.
_INTERNED: dict = {}

#: The largest rope scaling factor taken: Llama 4 Scout stretches 8192 to 10,485,760 positions
#: (its config's max_position_embeddings), 1280x; 4096 is 3.2x that.
MAX_ROPE_SCALING = 4096.0

#: peft's LoRA defaults for Llama-style models
#: (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: q_proj, v_proj).
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")


@lru_cache(maxsize=64)
def _field_names(cls) -> tuple[str, ...]:
    """The dataclass fields of a Setup class, in order."""
    return tuple(f.name for f in dataclass_fields(cls))


def _versions_field(value) -> tuple[tuple[str, str], ...]:
    """Sorted (library, version) pairs from a dict, pairs or ``"a=1,b=2"``; checked."""
    if isinstance(value, str):
        value = [item.split("=", 1) for item in value.split(",") if item.strip()]
    items = value.items() if isinstance(value, dict) else value
    out = {}
    for pair in items:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"versions are (library, version) pairs, got {pair!r}")
        name, version = str(pair[0]).strip().lower(), str(pair[1]).strip()
        if name not in LIBRARIES:
            raise ValueError(f"versions: unknown library {name!r}; choose from: {', '.join(LIBRARIES)}")
        parse_version(version)
        out[name] = version
    return tuple(sorted(out.items()))


@dataclass(frozen=True, eq=True)
class Setup:
    """One training or inference configuration. Sizes are counts, never bytes."""

    mode: Mode = Mode.FULL
    precision: Precision = Precision.BF16
    quant: Quant = Quant.NONE
    optimizer: Optimizer = Optimizer.ADAMW
    optimizer_impl: OptimizerImpl = OptimizerImpl.AUTO
    batch: int = 1
    seq: int = 512
    grad_ckpt: bool = False
    attn: Attention = Attention.SDPA
    lora_rank: int = 16
    lora_alpha: int | None = None  # default 2 * rank, a common convention
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    device: Device = Device.CUDA
    world_size: int = 1
    sharding: Sharding = Sharding.NONE
    new_tokens: int = 0  # inference: tokens decoded after the prompt of `seq` tokens
    loop: Loop = Loop.TRAINER
    grad_accum: int = 1  # micro-batches per optimizer step (gradients resident from the second)
    keep_grads: bool = False  # zero_grad(set_to_none=False): zeroed gradients stay allocated
    use_cache: bool = False  # training/eval forward builds a KV cache (model.config.use_cache)
    loss: Loss = Loss.CAUSAL_LM
    trainer: Trainer = Trainer.HF
    # --trainer dpo: where the reference log-probs come from (RefModel); None takes TRL's
    # default for the mode (adapter with LoRA / QLoRA, separate otherwise; dpo_trainer.py:907-915)
    ref_model: RefModel | None = None
    # --trainer sft: how variable-length examples reach the step (Packing); None: rows of equal
    # length, no padding (the synthetic batch of every other setup)
    packing: Packing | None = None
    # --trainer dpo: each response's tokens (chosen and rejected alike), the rest of the sequence the
    # prompt, whose rows the fused head skips on CUDA (None: a one-token prompt, the bound).
    # --trainer sft: SFT's loss on the last ``completion_only`` tokens of each sequence, the rest the
    # prompt (a prompt-completion dataset, SFTConfig.completion_only_loss; trl 1.16.0
    # sft_trainer.py:1408-1433 masks the prompt's labels to -100); None: every token is labelled
    completion_only: int | None = None
    # --trainer grpo: completions sampled per prompt (GRPOConfig.num_generations) and their
    # length (max_completion_length); None takes GRPOConfig's default (trainers.trainer_defaults)
    num_generations: int | None = None
    max_completion: int | None = None
    # --trainer grpo: optimizer passes over each generation batch (GRPOConfig.num_iterations, the
    # paper's mu); above 1 TRL runs a no-grad log-prob pass after generation (estimator/grpo.py)
    num_iterations: int | None = None
    # --trainer grpo: the KL coefficient (GRPOConfig.beta, default 0.0). Not 0: a reference, the
    # LoRA policy with its adapter disabled or (full fine-tuning) a frozen copy of the model, and
    # its no-grad log-prob pass after generation (trl 1.16.0 grpo_trainer.py:983-1003, :2710-2737)
    beta: float | None = None
    # library versions whose semantics to assume, over the installed ones (estimator/versions.py);
    # () assumes what is installed
    versions: tuple[tuple[str, str], ...] = ()
    # CUDA compute capability of the GPU ("7.5"), where it decides the sdpa kernel: flash
    # attention needs 8.0 or newer (torch's sdp_utils check_flash_attention_hardware_support);
    # "" assumes a GPU that has it
    compute_capability: str = ""
    # a model type outside the registry (estimator/archs) is refused unless this is set: then
    # its parameters come from a meta-device build and its activations from the Llama-style
    # terms (--allow-llama-fallback; the estimate carries a note with the known error range)
    allow_llama_fallback: bool = False
    # PYTORCH_CUDA_ALLOC_CONF as the run sets it (estimator/allocator.py AllocConf: the
    # settings that change reserved memory, expandable_segments and max_split_size_mb);
    # "" is torch's default. Stored canonical: "expandable_segments:True,max_split_size_mb:128"
    alloc_conf: str = ""
    # torch.cuda.empty_cache() every N optimizer steps (transformers TrainingArguments
    # torch_empty_cache_steps; the profiler's harness empties it before every step: 1);
    # 0: never
    empty_cache_steps: int = 0
    load: Load = Load.PRETRAINED
    # --mode qlora: the preparation for k-bit training (KbitPrep; auto: as TRL decides)
    kbit_prep: KbitPrep = KbitPrep.AUTO
    # FSDP1 with adapters: peft's adapter units or decoder layers only (FsdpWrap)
    fsdp_wrap: FsdpWrap = FsdpWrap.PEFT
    # a rope scaling factor over the config's (linear / dynamic / yarn stretch the positions
    # by it): sequences past max_position_embeddings up to factor x it; 0 keeps the config's
    rope_scaling: float = 0.0

    def __post_init__(self) -> None:
        # accept strings for the enums so callers and JSON records can pass plain values
        for name, enum in (("mode", Mode), ("precision", Precision), ("quant", Quant),
                           ("optimizer", Optimizer), ("optimizer_impl", OptimizerImpl),
                           ("attn", Attention), ("device", Device), ("sharding", Sharding), ("loop", Loop),
                           ("loss", Loss), ("load", Load), ("trainer", Trainer), ("kbit_prep", KbitPrep),
                           ("fsdp_wrap", FsdpWrap)):
            object.__setattr__(self, name, enum.parse(getattr(self, name)))
        if self.ref_model is not None:
            object.__setattr__(self, "ref_model", RefModel.parse(self.ref_model))
        if self.packing is not None:
            object.__setattr__(self, "packing", Packing.parse(self.packing))
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets",
                               tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        else:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "versions", _versions_field(self.versions))
        cc = str(self.compute_capability or "").strip()
        if cc and not (cc.count(".") == 1 and all(part.isdigit() for part in cc.split("."))):
            raise ValueError(f"compute_capability is MAJOR.MINOR (e.g. 7.5), got {self.compute_capability!r}")
        object.__setattr__(self, "compute_capability", cc)
        for name in ("grad_ckpt", "keep_grads", "use_cache", "allow_llama_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "alloc_conf", str(AllocConf.parse(self.alloc_conf)))
        if isinstance(self.empty_cache_steps, bool) or not isinstance(self.empty_cache_steps, int) \
                or self.empty_cache_steps < 0:
            raise ValueError(f"empty_cache_steps must be a non-negative integer, got {self.empty_cache_steps!r}")
        for name in ("batch", "seq", "world_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.rope_scaling, bool) or not isinstance(self.rope_scaling, int | float) \
                or not 0 <= self.rope_scaling <= MAX_ROPE_SCALING or self.rope_scaling != self.rope_scaling:
            raise ValueError(f"rope scaling must be a factor between 1 and {MAX_ROPE_SCALING:g} (0: the config's), "
                             f"got {self.rope_scaling!r}")
        object.__setattr__(self, "rope_scaling", float(self.rope_scaling))
        if isinstance(self.new_tokens, bool) or not isinstance(self.new_tokens, int) or self.new_tokens < 0:
            raise ValueError(f"new_tokens must be a non-negative integer, got {self.new_tokens!r}")
        if self.mode in (Mode.LORA, Mode.QLORA):
            if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
                raise ValueError(f"lora rank must be a positive integer, got {self.lora_rank!r}")
            if self.lora_alpha is not None and self.lora_alpha <= 0:
                raise ValueError(f"lora alpha must be positive, got {self.lora_alpha!r}")
            if not self.lora_targets:
                raise ValueError("lora targets are empty; name modules, e.g. q_proj,v_proj")
        if self.mode is Mode.QLORA and self.quant is Quant.NONE:
            raise ValueError("qlora needs a weight quantization: pass --quant nf4 (or nf4-dq, int8)")
        if self.mode in (Mode.FULL, Mode.LORA) and self.quant is not Quant.NONE:
            raise ValueError(
                f"quantization {self.quant} applies to inference and qlora only; "
                f"use --mode qlora to train adapters on a quantized model")
        if self.kbit_prep is not KbitPrep.AUTO and self.mode is not Mode.QLORA:
            raise ValueError(f"--kbit-prep {self.kbit_prep} prepares a quantized model for training: it applies "
                             f"to --mode qlora, not {self.mode}")
        if self.fsdp_wrap is FsdpWrap.LAYERS:
            self._check_layer_units()
        if self.world_size > 1 and self.sharding is Sharding.NONE:
            raise ValueError(
                f"world size {self.world_size} needs a sharding: ddp, zero1, zero2, zero3, fsdp, fsdp1 or "
                f"fsdp1-shard-grad-op")
        if not self.training and self.sharding not in (Sharding.NONE,):
            raise ValueError(f"sharding applies to training; {self.mode} runs on one device here")
        if self.loss is Loss.NONE and self.training:
            raise ValueError(f"--loss none computes no loss, so --mode {self.mode} has no backward to run; use it "
                             f"with --mode eval (a scoring forward, logits only)")
        if self.loss is Loss.CHUNKED_NLL and self.trainer not in (Trainer.SFT, Trainer.DPO, Trainer.GRPO):
            raise ValueError("--loss chunked-nll is TRL's fused LM head, which SFTTrainer installs: pass --trainer sft")
        if self.ref_model is not None and self.trainer is not Trainer.DPO:
            raise ValueError(f"--ref-model is DPO's reference model; --trainer {self.trainer} has none (pass "
                             f"--trainer dpo, or leave --ref-model out)")
        if self.completion_only is not None:
            if self.trainer not in (Trainer.SFT, Trainer.DPO):
                raise ValueError(f"--completion-only is SFTTrainer's completion_only_loss and DPO's response length; "
                                 f"--trainer {self.trainer} has neither (pass --trainer sft or dpo, or leave "
                                 f"--completion-only out)")
            if isinstance(self.completion_only, bool) or not isinstance(self.completion_only, int) \
                    or not 1 <= self.completion_only < self.seq:
                raise ValueError(f"--completion-only takes the completion's tokens, 1 to --seq - 1 = {self.seq - 1} "
                                 f"(the rest of each sequence is the prompt), got {self.completion_only!r}")
            if self.packing is not None:
                raise ValueError(f"--completion-only with --packing {self.packing} is not modelled; give rows of "
                                 f"equal length (leave --packing out)")
        if self.packing is not None and self.trainer is not Trainer.SFT:
            raise ValueError(f"--packing is SFTTrainer's collator choice; --trainer {self.trainer} has none "
                             f"(pass --trainer sft, or leave --packing out)")
        if self.trainer is Trainer.DPO:
            self._check_dpo()
        for name, flag in (("num_generations", "--num-generations"), ("max_completion", "--max-completion"),
                           ("num_iterations", "--num-iterations")):
            value = getattr(self, name)
            if value is not None and self.trainer is not Trainer.GRPO:
                raise ValueError(f"{flag} is a GRPO knob; --trainer {self.trainer} generates nothing (pass "
                                 f"--trainer grpo, or leave {flag} out)")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if self.beta is not None:
            if self.trainer is not Trainer.GRPO:
                raise ValueError(f"--beta is GRPO's KL coefficient; --trainer {self.trainer} has none (pass --trainer "
                                 f"grpo, or leave --beta out)")
            if isinstance(self.beta, bool) or not isinstance(self.beta, int | float) or not math.isfinite(self.beta) \
                    or self.beta < 0:
                raise ValueError(f"--beta must be a finite number >= 0, got {self.beta!r}")
            object.__setattr__(self, "beta", float(self.beta))
        if self.trainer is Trainer.GRPO:
            self._check_grpo()
        if self.trainer is Trainer.SFT:
            if not self.training:
                raise ValueError(f"--trainer sft trains; --mode {self.mode} runs no SFTTrainer step (use --mode full, "
                                 f"lora or qlora)")
            if self.loss not in (Loss.CHUNKED_NLL, Loss.CAUSAL_LM):
                raise ValueError(f"--trainer sft computes its own loss: --loss chunked-nll (trl >= 1.7) or causal-lm "
                                 f"(trl < 1.7), not {self.loss}")
            if self.loop is not Loop.TRAINER:
                raise ValueError(f"--trainer sft runs the Trainer's own loop; --loop {self.loop} is a hand-written "
                                 f"one (leave --loop trainer)")
            if self.loss is Loss.CHUNKED_NLL and self.sharding in (Sharding.ZERO3, Sharding.FSDP, Sharding.FSDP1,
                                                                   Sharding.FSDP1_GRAD_OP):
                raise ValueError(f"--loss chunked-nll under --sharding {self.sharding} (the LM head gathered for "
                                 f"the tiles) is not modelled yet; use --sharding ddp, zero1 or zero2")
        if self.optimizer is Optimizer.NONE and self.optimizer_impl is not OptimizerImpl.AUTO:
            raise ValueError("--optimizer none runs no optimizer: leave --optimizer-impl auto")
        if self.optimizer.bitsandbytes and self.optimizer_impl is OptimizerImpl.FUSED:
            raise ValueError(f"{self.optimizer} (bitsandbytes) has no fused/foreach choice; "
                             f"leave --optimizer-impl auto")

    def __hash__(self) -> int:  # cached: setups key the estimator's caches
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f) for f in self.__dataclass_fields__))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def shape_free(self) -> Setup:
        """The cache key of every estimator term that batch and sequence length do not change:
        this setup at batch 1, seq 1, no generated tokens, and with what no memory term reads
        (LoRA alpha; the LoRA fields of a non-LoRA mode) at their defaults. Memoised."""
        key = self.__dict__.get("_shape_free")
        if key is None:
            key = self._normalised(seq=1)
            object.__setattr__(self, "_shape_free", key)
        return key

    @property
    def per_sequence(self) -> Setup:
        """The cache key of terms linear in the batch (activations): as :attr:`shape_free`
        but keeping the sequence length. Memoised."""
        key = self.__dict__.get("_per_sequence")
        if key is None:
            key = self._normalised(seq=self.seq)
            object.__setattr__(self, "_per_sequence", key)
        return key

    def _normalised(self, seq: int) -> Setup:
        """A copy with the neutral values, built without re-validating (every field is
        already checked), and interned: equal keys are one object, so the estimator's
        caches match them by identity instead of comparing every field. The key is every
        dataclass field of the setup's class after :meth:`_neutral` (a new field is part of
        it without being named here)."""
        neutral = self._neutral(seq)
        cls, d = type(self), self.__dict__
        fields_key = (cls, *[neutral[name] if name in neutral else d[name] for name in _field_names(cls)])
        key = _INTERNED.get(fields_key)
        if key is None:
            key = object.__new__(cls)
            key.__dict__.update(self.__dict__)
            for name in ("_hash", "_shape_free", "_per_sequence", "_semantics"):
                key.__dict__.pop(name, None)
            key.__dict__.update(neutral)
            _INTERNED[fields_key] = key
        return key

    def _neutral(self, seq: int) -> dict:
        """The fields a normalised key sets to neutral values: batch 1, no generated tokens,
        the given sequence length, LoRA alpha (no memory term reads it) and, outside LoRA
        modes, the LoRA rank and targets at their defaults; the k-bit preparation as it resolves."""
        lora = self.mode in (Mode.LORA, Mode.QLORA)
        rank, targets = (self.lora_rank, self.lora_targets) if lora else (16, DEFAULT_LORA_TARGETS)
        return dict(batch=1, seq=seq, new_tokens=0, lora_alpha=None, lora_rank=rank, lora_targets=targets,
                    kbit_prep=self.resolved_kbit_prep if self.mode is Mode.QLORA else KbitPrep.AUTO)

    @property
    def semantics(self) -> Semantics:
        """What the assumed library versions change (installed ones under :attr:`versions`)."""
        found = self.__dict__.get("_semantics")
        if found is None:
            found = semantics_for(self.versions)
            object.__setattr__(self, "_semantics", found)
        return found

    @property
    def allocator(self):
        """The caching allocator's settings (:class:`estimator.allocator.AllocConf`)."""
        return AllocConf.parse(self.alloc_conf)

    @property
    def training(self) -> bool:
        return self.mode in (Mode.FULL, Mode.LORA, Mode.QLORA)

    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def resolved_optimizer_impl(self) -> OptimizerImpl:
        """What torch actually runs (torch/optim/optimizer.py::_default_to_fused_or_foreach):
        foreach on CUDA from torch 2.0, the for-loop before it and on CPU
        (Semantics.optimizer_foreach_default)."""
        if self.optimizer_impl is not OptimizerImpl.AUTO:
            return self.optimizer_impl
        cuda_foreach = self.device is Device.CUDA and self.semantics.optimizer_foreach_default
        return OptimizerImpl.FOREACH if cuda_foreach else OptimizerImpl.FORLOOP

    @property
    def resolved_kbit_prep(self) -> KbitPrep:
        """The preparation a QLoRA step runs (KbitPrep.AUTO resolved as TRL resolves it: none
        where the packed weights are sharded, FSDP and ZeRO-3; peft's otherwise); NONE outside QLoRA."""
        if self.mode is not Mode.QLORA:
            return KbitPrep.NONE
        if self.kbit_prep is not KbitPrep.AUTO:
            return self.kbit_prep
        return KbitPrep.NONE if self.shards_params else KbitPrep.PEFT

    @property
    def shards_params(self) -> bool:
        """Whether the parameters themselves are sharded (ZeRO-3, FSDP1, FSDP2): bitsandbytes'
        packed 4-bit weights are then stored in the compute dtype (``bnb_4bit_quant_storage``,
        which FSDP needs to flatten them: bitsandbytes PR #970)."""
        return self.sharding in (Sharding.ZERO3, Sharding.FSDP, Sharding.FSDP1, Sharding.FSDP1_GRAD_OP)

    @property
    def stream_precision(self) -> Precision:
        """The recipe the forward's unquantized tensors follow. peft's preparation casts every
        16-bit parameter but the packed weights to fp32 (KbitPrep.PEFT), and each bitsandbytes
        linear returns its input's dtype (bitsandbytes 0.50.2 nn/modules.py:626-637
        ``Linear4bit.forward``: ``.to(inp_dtype)``), so without autocast the embedding output,
        the residual stream, attention, the adapters and the logits are fp32 (the fp32 recipe's
        activations); under autocast (amp-*) the model is fp32-loaded anyway and autocast casts
        as before. Otherwise the recipe itself."""
        if self.resolved_kbit_prep is KbitPrep.PEFT and not self.precision.is_autocast:
            return Precision.FP32
        return self.precision

    @property
    def layer_units(self) -> bool:
        """FSDP1 LoRA with one unit per decoder layer (FsdpWrap.LAYERS): the layers' frozen
        weights get gradients and their modules save as in full training."""
        return self.fsdp_wrap is FsdpWrap.LAYERS

    @property
    def trains_layer_weights(self) -> bool:
        """Whether the decoder layers' weights get gradients: full training, and FSDP1 LoRA with
        layer units (the frozen weights' unsharded views are slices of a flat parameter that
        requires a gradient, so autograd computes theirs and their modules save for it)."""
        return self.mode is Mode.FULL or self.layer_units

    def _check_layer_units(self) -> None:
        """--fsdp-wrap layers: FSDP1, adapters, one dtype per flat parameter (FsdpWrap)."""
        if self.sharding not in (Sharding.FSDP1, Sharding.FSDP1_GRAD_OP) or self.mode is not Mode.LORA:
            raise ValueError(f"--fsdp-wrap layers is how FSDP1 wraps a LoRA model: it needs --mode lora and "
                             f"--sharding fsdp1 or fsdp1-shard-grad-op, not --mode {self.mode} --sharding "
                             f"{self.sharding}")
        if self.precision.param_bytes != FP32:
            raise ValueError(f"--fsdp-wrap layers puts a layer's {self.precision} weights and peft's fp32 adapters "
                             f"in one flat parameter, which FSDP1 refuses (\"Must flatten tensors with uniform "
                             f"dtype\"); use fp32 or an amp recipe, or --fsdp-wrap peft")

    def _check_dpo(self) -> None:
        """--trainer dpo's own checks, and TRL's default reference for the mode."""
        if not self.training:
            raise ValueError(f"--trainer dpo trains; --mode {self.mode} runs no DPOTrainer step (use --mode full, "
                             f"lora or qlora)")
        adapters = self.mode in (Mode.LORA, Mode.QLORA)
        if self.ref_model is None:
            object.__setattr__(self, "ref_model", RefModel.ADAPTER if adapters else RefModel.SEPARATE)
        if self.ref_model is RefModel.ADAPTER and not adapters:
            raise ValueError(f"--ref-model adapter disables a LoRA adapter to get the reference, and --mode "
                             f"{self.mode} trains none: use --mode lora or qlora, or --ref-model separate or "
                             f"precomputed")
        if not self.semantics.dpo_read:
            have = dict(self.versions).get("trl", "?")
            raise ValueError(f"--trainer dpo is modelled from trl 1.16's DPOTrainer; trl {have}'s was not read "
                             f"here (assume --versions trl=1.16)")
        self._check_trl_loop("dpo_trainer.py:954-962", "the reference model prepared by DeepSpeed or FSDP")

    def _check_trl_loop(self, head: str, sharded: str) -> None:
        """What TRL's preference and RL trainers share: their log-probs from the fused LM head
        (``head``: where the trainer installs it), the Trainer's own loop, one device or DDP
        (``sharded``: what is not modelled under DeepSpeed or FSDP)."""
        if self.loss is not Loss.CHUNKED_NLL:
            raise ValueError(f"--trainer {self.trainer} computes its log-probs with TRL's fused LM head (--loss "
                             f"chunked-nll, trl 1.16.0 {head}), not --loss {self.loss}")
        if self.loop is not Loop.TRAINER:
            raise ValueError(f"--trainer {self.trainer} runs the Trainer's own loop; --loop {self.loop} is a "
                             f"hand-written one (leave --loop trainer)")
        if self.sharding not in (Sharding.NONE, Sharding.DDP):
            raise ValueError(f"--trainer {self.trainer} under --sharding {self.sharding} ({sharded}) is not "
                             f"modelled yet; use --sharding ddp or one device")

    def _check_grpo(self) -> None:
        """--trainer grpo's own checks (GRPOConfig.__post_init__'s, trl 1.16.0 grpo_config.py:1096-1141),
        and GRPOConfig's defaults for the knobs left out."""
        from .trainers import GRPO_DEFAULTS
        for name, value in GRPO_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if not self.training:
            raise ValueError(f"--trainer grpo trains; --mode {self.mode} runs no GRPOTrainer step (use --mode full "
                             f"or lora)")
        if self.mode is Mode.QLORA:
            raise ValueError("--trainer grpo --mode qlora (generation through a quantized model) is not modelled yet; "
                             "use --mode full or lora")
        if not self.semantics.grpo_read:
            have = dict(self.versions).get("trl", "?")
            raise ValueError(f"--trainer grpo is modelled from trl 1.16's GRPOTrainer; trl {have}'s was not read "
                             f"here (assume --versions trl=1.16)")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations {self.num_generations}: GRPO needs at least 2 completions per "
                             f"prompt for its advantages (grpo_config.py:1137)")
        # steps_per_generation defaults to gradient_accumulation_steps, so one generation batch is
        # batch x world_size x grad_accum completions, which must hold whole prompt groups (:1098-1135)
        group = self.batch * self.world_size * self.grad_accum
        if group % self.num_generations:
            raise ValueError(f"the generation batch, --batch x --world-size x --grad-accum = {group} completions, "
                             f"must be divisible by --num-generations {self.num_generations} (TRL's check, "
                             f"grpo_config.py:1131)")
        if self.new_tokens:
            raise ValueError("--trainer grpo generates --max-completion tokens itself; leave --new-tokens out")
        self._check_trl_loop("grpo_trainer.py:1068-1073", "generation under DeepSpeed or FSDP")

    @property
    def adapter_bytes(self) -> int:
        """Bytes per LoRA adapter element: fp32, as peft keeps them (``autocast_adapter_dtype=True``),
        but bf16 for a quantized model under TRL's trainers (Semantics.trl_quantized_adapters_bf16)."""
        if self.mode is Mode.QLORA and self.trainer is not Trainer.HF and self.semantics.trl_quantized_adapters_bf16:
            return HALF
        return FP32

    def replace(self, **changes) -> Setup:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (enums as their strings)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[key] = value
        if not self.versions:
            del out["versions"]  # the installed versions: records keep their case keys
        if self.loss is Loss.CAUSAL_LM:
            del out["loss"]  # the default: records keep their case keys
        if not self.compute_capability:
            del out["compute_capability"]  # the default: records keep their case keys
        if not self.allow_llama_fallback:
            del out["allow_llama_fallback"]  # the default: records keep their case keys
        for name in ("alloc_conf", "empty_cache_steps"):
            if not out[name]:
                del out[name]  # the defaults: records keep their case keys
        if self.load is Load.PRETRAINED:
            del out["load"]  # the default: records keep their case keys
        if self.kbit_prep is KbitPrep.AUTO:
            del out["kbit_prep"]  # the default: records keep their case keys
        if self.fsdp_wrap is FsdpWrap.PEFT:
            del out["fsdp_wrap"]  # the default: records keep their case keys
        if not self.rope_scaling:
            del out["rope_scaling"]  # the default: records keep their case keys
        if self.trainer is Trainer.HF:
            del out["trainer"]  # the default: records keep their case keys
        for name in ("num_generations", "max_completion", "num_iterations"):
            if out.get(name) is None:
                out.pop(name, None)  # no GRPO: records keep their case keys
        if not self.beta:
            out.pop("beta", None)  # GRPOConfig's 0.0: records keep their case keys
        if self.ref_model is None:
            del out["ref_model"]  # no DPO: records keep their case keys
        if self.packing is None:
            del out["packing"]  # equal rows: records keep their case keys
        if self.completion_only is None:
            del out["completion_only"]  # every token labelled: records keep their case keys
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Setup:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown setup field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)
