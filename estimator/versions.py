"""Which library versions an estimate assumes, and what they change in memory.

The same model and setup take different memory under different transformers and torch
releases. The estimator reads the installed versions through ``importlib.metadata``
(no import of torch or transformers) unless the user names others
(``--versions transformers=4.48,torch=2.4``), and every estimate states the semantics it
assumed (``assumed_versions`` in ``--json``).

Each switch below is read from the released wheels (``pip download transformers==X``;
file and line in that wheel), and each is checked by measuring it where it can be: the
cpu and sim backends run under whatever transformers is installed
(``tests/test_versions.py`` runs in a venv with transformers 4.48).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import metadata

#: The libraries whose versions move memory, as pip names them.
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl")

_VERSION = re.compile(r"^\d+(\.\d+){0,3}")


def parse_version(text: str) -> tuple[int, ...]:
    """``"4.48.3"`` -> (4, 48, 3); ``"2.11.0+cu130"`` -> (2, 11, 0); a bare ``"4.48"`` is 4.48.0."""
    m = _VERSION.match(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a version number (e.g. 4.48 or 2.4.1)")
    parts = tuple(int(x) for x in m.group(0).split("."))
    return parts + (0,) * (3 - len(parts)) if len(parts) < 3 else parts


@lru_cache(maxsize=1)
def installed_versions() -> dict[str, str]:
    """The installed version of each library in :data:`LIBRARIES` (absent ones left out)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def parse_overrides(text: str) -> dict[str, str]:
    """``"transformers=4.48,torch=2.4"`` -> {"transformers": "4.48", "torch": "2.4"}."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in str(text).split(","))):
        name, sep, version = item.partition("=")
        name = name.strip().lower()
        if not sep or not version.strip():
            raise ValueError(f"--versions takes NAME=VERSION pairs separated by commas, got {item!r}")
        if name not in LIBRARIES:
            raise ValueError(f"--versions: unknown library {name!r}; choose from: {', '.join(LIBRARIES)}")
        parse_version(version)
        out[name] = version.strip()
    return out


def resolve(overrides: dict[str, str] | tuple | None = None) -> tuple[tuple[str, str], ...]:
    """The versions an estimate assumes: the installed ones, with ``overrides`` on top;
    sorted pairs, hashable for a frozen Setup."""
    merged = dict(installed_versions())
    merged.update(dict(overrides or {}))
    return tuple(sorted(merged.items()))


@lru_cache(maxsize=4096)
def _at_least(versions: tuple[tuple[str, str], ...], name: str, version: str, missing: bool) -> bool:
    have = dict(versions).get(name)
    if have is None:
        return missing
    return parse_version(have) >= parse_version(version)


@lru_cache(maxsize=256)
def semantics_for(overrides: tuple[tuple[str, str], ...]) -> Semantics:
    """One Semantics per set of overrides (installed versions under them), shared by every
    setup that names them."""
    return Semantics(resolve(overrides))


@dataclass(frozen=True)
class Semantics:
    """What the assumed versions do that moves memory in every architecture; what they
    change in one family is that family's switches (estimator/archs/<family>.py)."""

    versions: tuple[tuple[str, str], ...]

    def __hash__(self) -> int:  # cached: semantics key the traits' cache (archs.traits)
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(self.versions)
            object.__setattr__(self, "_hash", cached)
        return cached

    def at_least(self, name: str, version: str, missing: bool = True) -> bool:
        """Whether library ``name`` is at ``version`` or newer (``missing``: when it is absent)."""
        return _at_least(self.versions, name, version, missing)

    @cached_property
    def loss_copies_shifted_logits(self) -> bool:
        """transformers < 4.49: the causal-LM loss shifts the fp32 logits with
        ``logits[..., :-1, :].contiguous()`` (4.48.3 loss/loss_utils.py:39; in the model's
        forward before 4.46, 4.45.0 models/llama/modeling_llama.py:1221), a second fp32
        (b, s-1, vocab) tensor at the loss. 4.49 pads the labels instead and shifts them
        (4.49.0 loss/loss_utils.py:39; transformers PR #35646)."""
        return not self.at_least("transformers", "4.49")

    @cached_property
    def sdpa_repeats_kv(self) -> bool:
        """transformers < 4.54 (or torch < 2.5) repeats grouped keys and values to every
        head before sdpa (4.48.3 integrations/sdpa_attention.py:30 ``repeat_kv``); 4.54
        passes ``enable_gqa=True`` when there is no mask and torch >= 2.5 (4.54.0
        integrations/sdpa_attention.py:27-57; transformers PR #39412). Modelled in training
        (what attention saves); the no-grad prefill's transient copies are not."""
        return not (self.at_least("transformers", "4.54") and self.at_least("torch", "2.5"))

    @cached_property
    def sdpa_inputs_contiguous(self) -> bool:
        """transformers < 4.56 makes sdpa's query, key and value contiguous first (4.55.0
        integrations/sdpa_attention.py:72-74; gone in 4.56.0): kernels that lay their output
        out like the query (flash, cuDNN) then return (b, heads, s, d), and merging the heads
        (``transpose(1, 2).contiguous()``, 4.55.0 :99) copies it for o_proj to save."""
        return not self.at_least("transformers", "4.56")

    @cached_property
    def moe_experts_fused(self) -> bool:
        """transformers >= 5 stores MoE experts as fused 3-D parameters (5.0.0
        models/mixtral/modeling_mixtral.py:63-72 ``MixtralExperts.gate_up_proj``, ``down_proj``),
        which bitsandbytes leaves unquantized: it replaces nn.Linear modules
        (integrations/bitsandbytes.py ``replace_with_bnb_linear``). transformers 4.x built
        every expert from nn.Linear (4.57.0 modeling_mixtral.py:63), all quantized. Seen with
        bitsandbytes 0.50.2 under 5.24 (transformers' own swap, profiler/measure/quant.py): a
        one-layer Mixtral's experts stay bf16 Parameters, its attention linears become
        Params4bit, as many values as quantized_params counts; 4.x not run here."""
        return self.at_least("transformers", "5.0")

    @cached_property
    def kbit_prep_casts_packed_storage(self) -> bool:
        """peft < 0.10's ``prepare_model_for_kbit_training`` casts every fp16/bf16 parameter to
        fp32 (0.9.0 peft/utils/other.py:104-107), the packed 4-bit weights too where they are
        stored in a 16-bit ``bnb_4bit_quant_storage`` (sharded QLoRA: Setup.shards_params),
        doubling their bytes; 0.10 skips ``Params4bit`` (0.10.0 utils/other.py:104-109; 0.21
        :204-209). Otherwise the list is the same from 0.3 (``prepare_model_for_int8_training``,
        0.3.0 utils/other.py:51-54) to 0.21: every fp16/bf16 parameter (KbitPrep.PEFT)."""
        return not self.at_least("peft", "0.10")

    @cached_property
    def optimizer_foreach_default(self) -> bool:
        """torch >= 2.0 runs torch.optim's foreach implementation by default when every
        parameter is on CUDA (torch/optim/optimizer.py ``_default_to_fused_or_foreach``, 2.13.0
        :161-186; adam.py :938 calls it when neither ``foreach`` nor ``fused`` is given); torch
        1.x took the for-loop path (1.13 torch/optim/adamw.py ``adamw``: "Placeholder for more
        complex foreach logic to be added when value is not set", ``foreach = False``). The
        foreach path's ``_foreach_sqrt(exp_avg_sqs)`` is one optimizer-state-sized list, the
        for-loop's temporaries two tensors of the largest parameter (estimator/optimizer.py)."""
        return self.at_least("torch", "2.0")

    @cached_property
    def sft_loss_chunked(self) -> bool:
        """trl >= 1.7: SFTConfig's ``loss_type`` defaults to ``"chunked_nll"`` (1.7.0
        trl/trainer/sft_config.py:335-336; 1.6.0 sft_config.py:297-308 set ``"nll"``, the
        model's own causal-LM loss); from 1.16 ``"chunked_nll"`` is an alias of ``"nll"``,
        which runs the fused LM head always (1.16.0 sft_config.py:314-321, sft_trainer.py:1144
        ``add_fused_lm_head``). Absent trl: the installed-release default, chunked."""
        return self.at_least("trl", "1.7")

    @cached_property
    def sft_grad_ckpt_default(self) -> bool:
        """trl >= 0.22: SFTConfig's ``gradient_checkpointing`` defaults to True (0.22.0
        trl/trainer/sft_config.py:111-112; 1.16.0 trl/trainer/base_config.py:62, for every TRL
        trainer); 0.21 kept TrainingArguments' False."""
        return self.at_least("trl", "0.22")

    @cached_property
    def dpo_read(self) -> bool:
        """trl >= 1.16: the DPOTrainer modelled here, read from 1.16.0's source: the policy's
        log-probs and the reference's from the fused LM head (trl/trainer/dpo_trainer.py:954-962
        ``add_fused_lm_head``, :1299 and :1336-1338 ``fused_lm_head=True``). Earlier releases'
        DPOTrainer was not read, so --trainer dpo refuses them. Absent trl: the installed-release
        default."""
        return self.at_least("trl", "1.16")

    @cached_property
    def trl_quantized_adapters_bf16(self) -> bool:
        """trl >= 1.16 (the release read): SFTTrainer, DPOTrainer and GRPOTrainer cast a 4-bit or
        8-bit model's trainable adapter parameters to bf16 after peft wraps it (1.16.0
        sft_trainer.py:902-911, dpo_trainer.py:726-729, grpo_trainer.py:538-541: "to follow the
        recommendations of the original paper"), where peft alone keeps them fp32
        (``autocast_adapter_dtype``); so their gradients and AdamW's state are bf16 too. Earlier
        releases were not read: peft's fp32 is assumed there."""
        return self.at_least("trl", "1.16")

    @cached_property
    def grpo_read(self) -> bool:
        """trl >= 1.16: the GRPOTrainer modelled here, read from 1.16.0's source: generation with
        ``model.generate`` (trl/trainer/grpo_trainer.py:1873), the policy's log-probs and entropy
        from the fused LM head (:1068-1073, :1498 ``fused_lm_head=True``). Earlier releases'
        GRPOTrainer (the full logits and ``selective_log_softmax``) was not read, so --trainer grpo
        refuses them. Absent trl: the installed-release default."""
        return self.at_least("trl", "1.16")

    def to_dict(self) -> dict:
        return {"versions": dict(self.versions),
                "loss_copies_shifted_logits": self.loss_copies_shifted_logits,
                "sdpa_repeats_kv": self.sdpa_repeats_kv,
                "sdpa_inputs_contiguous": self.sdpa_inputs_contiguous,
                "moe_experts_fused": self.moe_experts_fused,
                "optimizer_foreach_default": self.optimizer_foreach_default,
                "kbit_prep_casts_packed_storage": self.kbit_prep_casts_packed_storage,
                "sft_loss_chunked": self.sft_loss_chunked,
                "sft_grad_ckpt_default": self.sft_grad_ckpt_default,
                "dpo_read": self.dpo_read, "grpo_read": self.grpo_read}
        # what the versions change in one architecture is a trait of its family
        # (estimator/archs/<family>.py switches; archs.traits)
