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
from functools import lru_cache
from importlib import metadata

#: The libraries whose versions move memory, as pip names them.
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")

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


@dataclass(frozen=True)
class Semantics:
    """What the assumed versions do that moves memory (the shipped architectures)."""

    versions: tuple[tuple[str, str], ...]

    def _at_least(self, name: str, version: str, missing: bool = True) -> bool:
        have = dict(self.versions).get(name)
        if have is None:
            return missing
        return parse_version(have) >= parse_version(version)

    @property
    def loss_copies_shifted_logits(self) -> bool:
        """transformers < 4.49: the causal-LM loss shifts the fp32 logits with
        ``logits[..., :-1, :].contiguous()`` (4.48.3 loss/loss_utils.py:39; in the model's
        forward before 4.46, 4.45.0 models/llama/modeling_llama.py:1221), a second fp32
        (b, s-1, vocab) tensor at the loss. 4.49 pads the labels instead and shifts them
        (4.49.0 loss/loss_utils.py:39; transformers PR #35646)."""
        return not self._at_least("transformers", "4.49")

    @property
    def sdpa_repeats_kv(self) -> bool:
        """transformers < 4.54 (or torch < 2.5) repeats grouped keys and values to every
        head before sdpa (4.48.3 integrations/sdpa_attention.py:30 ``repeat_kv``); 4.54
        passes ``enable_gqa=True`` when there is no mask and torch >= 2.5 (4.54.0
        integrations/sdpa_attention.py:27-57; transformers PR #39412). Modelled in training
        (what attention saves); the no-grad prefill's transient copies are not."""
        return not (self._at_least("transformers", "4.54") and self._at_least("torch", "2.5"))

    @property
    def sdpa_inputs_contiguous(self) -> bool:
        """transformers < 4.56 makes sdpa's query, key and value contiguous first (4.55.0
        integrations/sdpa_attention.py:72-74; gone in 4.56.0): kernels that lay their output
        out like the query (flash, cuDNN) then return (b, heads, s, d), and merging the heads
        (``transpose(1, 2).contiguous()``, 4.55.0 :99) copies it for o_proj to save."""
        return not self._at_least("transformers", "4.56")

    @property
    def moe_experts_fused(self) -> bool:
        """transformers >= 5 stores MoE experts as fused 3-D parameters (5.0.0
        models/mixtral/modeling_mixtral.py:63-72 ``MixtralExperts.gate_up_proj``, ``down_proj``),
        which bitsandbytes leaves unquantized: it replaces nn.Linear modules
        (integrations/bitsandbytes.py ``replace_with_bnb_linear``). transformers 4.x built
        every expert from nn.Linear (4.57.0 modeling_mixtral.py:63), all quantized. Cited,
        not measured here (no bitsandbytes on this machine)."""
        return self._at_least("transformers", "5.0")

    @property
    def opt_eager_clamps_scores(self) -> bool:
        """transformers < 4.49: OPT's eager attention clamps the masked scores with
        ``torch.max(attn_weights, torch.tensor(finfo.min))`` (4.46.0 models/opt/modeling_opt.py:201,
        4.48.3 :201), whose backward keeps its input: one more (b, heads, s, s) tensor saved per
        layer; 4.49.0 calls eager_attention_forward without it (:168)."""
        return not self._at_least("transformers", "4.49")

    @property
    def gpt2_own_attention(self) -> bool:
        """transformers < 4.48: GPT-2 runs its own attention classes (4.42.4
        models/gpt2/modeling_gpt2.py:563 GPT2SdpaAttention; 4.46.0 :458) rather than the shared
        attention functions (4.48.3 :328 ``ALL_ATTENTION_FUNCTIONS``; 4.47 not read, taken as
        the old classes): sdpa gets the (b, heads, s, d) views of c_attn's output without
        ``contiguous()`` (4.42.4 :641-644 only for torch < 2.2 with a mask), so the kernel's
        output merges its heads without a copy (:660 ``transpose(1, 2).contiguous()``)."""
        return not self._at_least("transformers", "4.48")

    @property
    def gpt2_mask_buffers(self) -> bool:
        """GPT-2's attention layers register a (max_positions, max_positions) bool causal mask
        and a scalar ``masked_bias`` as buffers, one per layer (4.42.4
        models/gpt2/modeling_gpt2.py:142-149; still in 4.50.0 :162-169; gone by 5.24); the
        switch is taken at 4.51, the first release not read."""
        return not self._at_least("transformers", "4.51")

    @property
    def optimizer_foreach_default(self) -> bool:
        """torch >= 2.0 runs torch.optim's foreach implementation by default when every
        parameter is on CUDA (torch/optim/optimizer.py ``_default_to_fused_or_foreach``, 2.13.0
        :161-186; adam.py :938 calls it when neither ``foreach`` nor ``fused`` is given); torch
        1.x took the for-loop path (1.13 torch/optim/adamw.py ``adamw``: "Placeholder for more
        complex foreach logic to be added when value is not set", ``foreach = False``). The
        foreach path's ``_foreach_sqrt(exp_avg_sqs)`` is one optimizer-state-sized list, the
        for-loop's temporaries two tensors of the largest parameter (estimator/optimizer.py)."""
        return self._at_least("torch", "2.0")

    def prefill_full_logits(self, family: str) -> tuple[bool, bool]:
        """(every position's logits, and an fp32 copy of them) in a no-grad prefill: the
        causal-LM forward computes the last position's only where it takes
        ``logits_to_keep`` (generate passes 1 then). Llama family: ``num_logits_to_keep``
        from 4.45.0 (models/llama/modeling_llama.py:1214); before, every position and
        ``logits = logits.float()`` (4.44.2 :1208-1209; 4.42.4 :1193-1194, also Qwen2 :1236,
        Gemma-2 :1093, Phi-3 :1345, Mistral :1215). GPT-2: ``logits_to_keep`` from 4.53.0
        (models/gpt2/modeling_gpt2.py:1166; 4.52.1 :1233 ``lm_head(hidden_states)``). OPT:
        from 5.0.0 (models/opt/modeling_opt.py:738; 4.57.0 :833 every position,
        ``.contiguous()``). GPT-NeoX: from 4.49.0 (models/gpt_neox/modeling_gpt_neox.py:796;
        4.48.3 :1130 ``embed_out(hidden_states)``). BioGPT: from 4.57.0 (none in 4.56.0)."""
        first = {"llama": "4.45", "gpt2": "4.53", "opt": "5.0", "gpt_neox": "4.49", "biogpt": "4.57"}.get(family)
        full = first is not None and not self._at_least("transformers", first)
        return full, full and family == "llama"

    def rotary_caches(self, model_type: str) -> bool:
        """Whether every attention layer keeps its own rotary cos/sin tables for all
        positions: ``register_buffer("cos_cached", ...)`` and ``"sin_cached"``, (max positions,
        head_dim) in the default dtype at build time. Qwen2 until 4.44 (4.44.2
        models/qwen2/modeling_qwen2.py:160-161, built per layer :276; 4.45.0 one model-level
        Qwen2RotaryEmbedding :874 without them); Mixtral until 4.47 (4.47.0
        models/mixtral/modeling_mixtral.py:200; none in 4.48.3). Llama, Mistral, Phi-3 and
        Gemma-2 had dropped them by 4.42.4."""
        last = {"qwen2": "4.45", "mixtral": "4.48"}.get(model_type)
        return last is not None and not self._at_least("transformers", last)

    @property
    def gpt_neox_own_attention(self) -> bool:
        """transformers < 4.49: GPT-NeoX's eager attention scores with ``torch.baddbmm`` and
        a softmax in the compute dtype (4.42.4 models/gpt_neox/modeling_gpt_neox.py:281-301;
        4.48.3 :114-127), where 4.49.0 saves an fp32 softmax and its ``.to(dtype)`` copy
        (:121); and every attention layer registers a (max_positions, max_positions) bool
        causal mask and a ``masked_bias`` scalar as buffers (4.42.4 :113-131; 4.48.3 :276-300;
        gone in 4.49.0), before 4.45 beside fp32 rotary cos/sin tables of (max_positions,
        rotary dims) each (4.42.4 :589-613; 4.44.2 :120; 4.45.2 :165 keeps inv_freq only)."""
        return not self._at_least("transformers", "4.49")

    @property
    def gpt_neox_fp32_rotary(self) -> bool:
        """transformers < 4.45: GPT-NeoX's rotary tables are fp32 buffers returned as they are
        (4.42.4 models/gpt_neox/modeling_gpt_neox.py:597-621; 4.44.2 :514-515), so a 16-bit
        model's rotated query and key are promoted to fp32 (:246-249); eager attention scores
        and softmaxes them in fp32 and the cache keeps the fp32 key; 4.45.2 casts the tables
        to the input's dtype (:649)."""
        return not self._at_least("transformers", "4.45")

    def loss_in_compute_dtype(self, model_type: str) -> bool:
        """Whether the causal-LM loss is the model's own ``CrossEntropyLoss`` on the shifted
        logits in their dtype, without the fp32 upcast of the shared loss: GPT-NeoX through
        4.48.3 (models/gpt_neox/modeling_gpt_neox.py:1137; ``self.loss_function`` in 4.49.0
        :850), BioGPT through 4.46.0 (models/biogpt/modeling_biogpt.py:787; 4.48.3 :788 calls
        ``self.loss_function``, taken at 4.47, not read)."""
        first = {"gpt_neox": "4.49", "biogpt": "4.47"}.get(model_type)
        return first is not None and not self._at_least("transformers", first)

    def tuple_cache(self, model_type: str) -> bool:
        """Whether a forward with ``use_cache`` returns the attention's own key and value
        tensors as a tuple per layer (no copies) rather than a ``DynamicCache`` that
        concatenates them into new tensors. OPT: tuples through 4.48.3
        (models/opt/modeling_opt.py:316 ``past_key_value = (key_states, value_states)``),
        DynamicCache from 4.49.0 (:853). GPT-2: tuples through 4.50.0, the newest wheel read
        (models/gpt2/modeling_gpt2.py:308 ``present = (key_states, value_states)``; 4.42.4
        :339 ``present = (key, value)``), a Cache in 5.x; the switch is taken at 4.51."""
        # GPT-NeoX: ``present = (key, value)`` through 4.44.2 (models/gpt_neox/modeling_gpt_neox.py:241),
        # ``layer_past.update`` from 4.45.2 (:303; 4.45.0 not read). BioGPT: tuples through 4.50.0
        # (models/biogpt/modeling_biogpt.py:182), a Cache in 4.52.4 (:167); taken at 4.51
        first_cache = {"opt": "4.49", "gpt2": "4.51", "gpt_neox": "4.45", "biogpt": "4.51"}.get(model_type)
        return first_cache is not None and not self._at_least("transformers", first_cache)

    def to_dict(self) -> dict:
        return {"versions": dict(self.versions),
                "loss_copies_shifted_logits": self.loss_copies_shifted_logits,
                "sdpa_repeats_kv": self.sdpa_repeats_kv,
                "sdpa_inputs_contiguous": self.sdpa_inputs_contiguous,
                "moe_experts_fused": self.moe_experts_fused,
                "opt_eager_clamps_scores": self.opt_eager_clamps_scores,
                "gpt2_own_attention": self.gpt2_own_attention,
                "gpt2_mask_buffers": self.gpt2_mask_buffers,
                "optimizer_foreach_default": self.optimizer_foreach_default,
                "gpt_neox_own_attention": self.gpt_neox_own_attention,
                "gpt_neox_fp32_rotary": self.gpt_neox_fp32_rotary}
        # per-model switches (prefill_full_logits, rotary_caches, loss_in_compute_dtype,
        # tuple_cache) take a model type
