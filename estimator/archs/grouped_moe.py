"""The sparse MoE block DeepSeek-V3 and GLM-4.5 share (no family of its own: no ``ARCHS``).

transformers 5.24 builds it twice, line for line the same: models/deepseek_v3/
modeling_deepseek_v3.py:104-222 and models/glm4_moe/modeling_glm4_moe.py:253-392 -- a sigmoid
router whose weight (E, h) is its own parameter kept in fp32 (``_keep_in_fp32_modules_strict =
["e_score_correction_bias", "gate.weight"]``: deepseek :551, glm4_moe :460) with an fp32
``e_score_correction_bias`` buffer, groups of E / n_group scored by their top-2 sum and
``topk_group`` kept, top-k weights normalised (``norm_topk_prob``) and scaled by
``routed_scaling_factor``; fused grouped_mm experts ``gate_up_proj`` (E, 2f, h) and ``down_proj``
(E, h, f); an always-on shared-expert MLP of ``moe_intermediate_size * n_shared_experts``; the
first ``first_k_dense_replace`` layers a dense SwiGLU MLP of ``intermediate_size`` instead
(deepseek :493-496, glm4_moe :402-405).

:class:`GroupedTopkMoE` holds what the two families read, count and save of it; each family's
module cites its own lines for its attention and its defaults.
"""
from __future__ import annotations

from typing import ClassVar

from ..configcheck import MAX_EXPERTS, MAX_INTERMEDIATE, MAX_LAYERS, ConfigError, Limit, check_shapes
from ..setup import Attention, Device, Mode
from ..units import FP32
from .base import Linear

#: bytes of an int64 index (torch.topk's and torch.sort's indices, what advanced indexing saves)
INT64 = 8
#: first_k_dense_replace may be 0 (every layer MoE: deepseek :493, glm4_moe :402)
_DENSE_LAYERS = Limit(MAX_LAYERS.name, 0, MAX_LAYERS.hi, MAX_LAYERS.why)
#: the MoE's (name, value) pairs a family keeps in ModelSpec.family_fields
MOE_FIELDS = ("n_shared_experts", "first_k_dense_replace", "dense_intermediate_size", "n_group", "topk_group")


class GroupedTopkMoE:
    """A mixin for an :class:`~estimator.archs.base.Arch` whose MoE layers are this block; the
    family sets :attr:`moe_source` (its modeling file and class prefix, for the messages) and
    reads its attention itself."""

    #: (modeling file, class-name prefix) that the config errors cite
    moe_source: ClassVar[tuple[str, str]] = ("", "")
    # transformers conversion_mapping.py:56 and :60 map deepseek_v3 and glm4_moe onto qwen2_moe, whose
    # names peft 0.21 turns into target parameters (transformers_weight_conversion.py:339-344)
    peft_moe_names = {"gate": "gate", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                      "down_proj": "down_proj"}

    def read_moe(self, f, out: dict, defaults: dict) -> tuple[dict, dict]:
        """The MoE fields of ``f`` (``defaults``: the configuration class's), checked as the router
        views them; returns the spec fields to add and the family_fields ints of :data:`MOE_FIELDS`."""
        source, cls = self.moe_source
        experts = f.int("n_routed_experts", "num_local_experts", limit=MAX_EXPERTS,
                        default=defaults["n_routed_experts"])
        per_token = f.int("num_experts_per_tok", limit=MAX_EXPERTS, default=defaults["num_experts_per_tok"])
        check_shapes(f.where, out["hidden_size"], out["num_heads"], out["num_kv_heads"], head_dim_given=True,
                     experts=experts, experts_per_token=per_token)
        ints = {"n_shared_experts": f.int("n_shared_experts", limit=MAX_EXPERTS, default=defaults["n_shared_experts"]),
                "first_k_dense_replace": f.int("first_k_dense_replace", limit=_DENSE_LAYERS,
                                               default=defaults["first_k_dense_replace"]),
                "n_group": f.int("n_group", limit=MAX_EXPERTS, default=defaults["n_group"]),
                "topk_group": f.int("topk_group", limit=MAX_EXPERTS, default=defaults["topk_group"])}
        moe_f = f.int("moe_intermediate_size", limit=MAX_INTERMEDIATE, default=defaults["moe_intermediate_size"])
        if not experts or not ints["n_shared_experts"]:
            raise ConfigError(f"{f.where}: n_routed_experts and n_shared_experts must be at least 1 "
                              f"({cls}MoE builds both, {source})")
        group, keep = ints["n_group"], ints["topk_group"]
        # the router views the scores as (T, n_group, E / n_group) and takes each group's top 2
        if not group or experts % group or experts // group < 2 or not 1 <= keep <= group:
            raise ConfigError(f"{f.where}: n_group must divide n_routed_experts ({experts}) into groups of at least "
                              f"2 and topk_group be between 1 and n_group ({cls}TopkRouter, "
                              f"{source}); got n_group {group}, topk_group {keep}")
        if per_token > keep * (experts // group):
            raise ConfigError(f"{f.where}: num_experts_per_tok ({per_token}) must be at most the experts of the "
                              f"topk_group kept groups ({keep} x {experts // group})")
        f.number("routed_scaling_factor")
        f.bool("norm_topk_prob", True)
        ints["dense_intermediate_size"] = out["intermediate_size"]
        return dict(num_experts=experts, experts_per_token=per_token, intermediate_size=moe_f), ints

    # --- the inventory ------------------------------------------------------------------

    def moe_linears(self, spec) -> list[Linear]:
        """An MoE layer's matrices after its attention: the routed experts, the router, the
        shared experts (named_parameters order: experts, gate, shared_experts)."""
        h, f, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
        shared = f * _fields(spec)["n_shared_experts"]
        return [Linear("gate_up_proj", "mlp", h, 2 * f, False, copies=e, fused_experts=True, parts=2),
                Linear("down_proj", "mlp", f, h, False, copies=e, fused_experts=True),
                Linear("gate", "mlp", h, e, False, router=True),
                Linear("gate_proj", "mlp", h, shared, False), Linear("up_proj", "mlp", h, shared, False),
                Linear("down_proj", "mlp", shared, h, False)]

    def dense_layers(self, spec):
        return _fields(spec)["first_k_dense_replace"]

    def dense_mlp_linears(self, spec) -> list[Linear]:
        """The dense layers' SwiGLU MLP of ``intermediate_size``, no bias."""
        h, f = spec.hidden_size, _fields(spec)["dense_intermediate_size"]
        return [Linear("gate_proj", "mlp", h, f, False), Linear("up_proj", "mlp", h, f, False),
                Linear("down_proj", "mlp", f, h, False)]

    # --- the memory terms ---------------------------------------------------------------

    def moe_base(self, spec, setup, terms: dict[str, int], strip: tuple[str, ...] = ()) -> dict[str, int]:
        """A layer's generic terms without the generic MLP, MoE and LoRA ones (nor those starting
        with ``strip``), and the adapters' terms as peft 0.21 makes them here: it wraps the fused
        experts and the router as parameters (ParamWrapper: a merged weight per forward,
        activations.lora_expert_weights), never copying their input, so of the generic adapters'
        terms only the nn.Linear ones' fp32 input copies are kept. The family adds its attention's
        terms to it, then :meth:`moe_saved` the MoE's (the order is the allocator's replay order)."""
        out = {k: v for k, v in terms.items() if not k.startswith(("mlp", "moe_", "lora_") + strip)}
        if setup.mode is Mode.LORA:
            from ..params import lora_targets  # params reads the registry: imported at call time
            r = setup.lora_rank
            adapters = sum(FP32 * (lin.in_features + r) for lin in lora_targets(spec, setup.lora_targets)
                           if not (lin.fused_experts or lin.router))
            if adapters:
                out["lora_adapters"] = adapters
        return out

    def moe_saved(self, spec, setup, out: dict[str, int]) -> tuple[dict[str, int], int, int]:
        """What the MoE block saves per token in training, added to ``out`` (:meth:`moe_base` and the
        family's attention terms), with the dense layers' difference and the experts-only-LoRA prefix
        (:meth:`Arch.saved_quirk`'s three values).

        The router: its ``hidden.type(fp32)`` copy (saved by F.linear for its fp32 weight's gradient),
        the sigmoid's fp32 scores (E), the group top-2's int64 indices (n_group x 2), the group
        top-k's (topk_group), the ``masked_fill`` bool mask (E), the top-k's indices (k, also gather's
        index), the normalising sum (1) and the in-place division's operands (k fp32 twice);
        grouped_mm (integrations/moe.py:424-537): ``perm // k``, ``perm`` and ``inv_perm`` (int64,
        S = T x k), the gathered routing weights (fp32, S) and the down output (S, h) the weighting
        saves, the gathered inputs (S, h) for trainable experts, the gate_up output (2f: silu's input
        and up are views of it), silu's output and the product for trainable experts; the
        shared-expert MLP (f x n_shared): gate_up outputs, silu and the product (its input is the
        normed input the generic ``linear_inputs`` counts). The dense layers' MLP instead of all that."""
        from ..params import lora_targets  # params reads the registry: imported at call time
        m = _fields(spec)
        p, h = setup.precision.compute_bytes, spec.hidden_size
        full = setup.mode is Mode.FULL
        targets = lora_targets(spec, setup.lora_targets) if setup.mode is Mode.LORA else []
        experts = full or any(lin.fused_experts for lin in targets)
        router = full or any(lin.router for lin in targets)
        f, k, e = spec.intermediate_size, spec.experts_per_token, spec.num_experts
        shared = f * m["n_shared_experts"]
        gated = 4 if full else 3  # gate, act(gate), up (and the product for a trainable down_proj)
        out["moe_router"] = (FP32 * h if router else 0) + FP32 * e + e \
            + INT64 * (2 * m["n_group"] + m["topk_group"] + k) + FP32 * (1 + 2 * k)
        out["moe_routing"] = INT64 * 3 * k + FP32 * k + (k * p * h if experts else 0)
        out["mlp"] = k * p * f * (4 if experts else 3)
        out["moe_weighted"] = k * p * h
        out["moe_shared"] = shared * p * gated
        moe = sum(out[x] for x in ("moe_router", "moe_routing", "mlp", "moe_weighted", "moe_shared"))
        dense = m["dense_intermediate_size"] * p * gated
        prefix = 0
        if targets and not any(lin.group == "attention" or lin.router for lin in targets):
            # LoRA on the fused experts only (peft's gate_proj/up_proj/down_proj): nothing before the first
            # MoE layer's experts needs a gradient, so the dense layers save nothing, and of the first MoE
            # layer only its experts save: the gathered input and the down input for the stacks'
            # gradients, the gate_up output and silu's output, the routing weights the weighting keeps for
            # the down output's gradient and ``inv_perm`` (the input needs none: no ``perm`` indices);
            # the generic first-layer term already took off that layer's input norm. Not checked: the sim
            # (DeepSeek-V3 reduced, 1 dense + 3 MoE, b2 x s1024) saves ~4 x k x f x p per token less than
            # this in that first MoE layer (forward +1.59 %, backward +2.05 %), so it stays refused
            layer = sum(out.values())
            first_experts = k * p * h + k * p * f * 4 + (FP32 + INT64) * k
            per_norm = FP32 * h + FP32
            prefix = first_experts + per_norm - layer - self.dense_layers(spec) * (layer + dense - moe)
        return out, dense - moe, prefix

    def recomputed_quirk(self, spec, setup, generic: int) -> int:
        """None of the generic grouped_mm locals (activations.recomputed_moe_locals): the shared-expert
        MLP runs after the routed experts (deepseek :215-222, glm4_moe :385-392: ``hidden_states +
        self.shared_experts(residuals)``), so a checkpointed layer's recomputation stops in it (at its
        down_proj's saved tensor), after the experts function returned and freed its (S, h) locals.
        The peak there is later, in the layer's backward of the experts' routing-weight product
        (:meth:`recomputed_experts_backward`)."""
        return 0

    def recomputed_experts_backward(self, spec, setup) -> tuple[int, int, int]:
        """The first MoE layer's backward of ``weighted_out = proj_out * sample_weights_g.unsqueeze(-1)``
        (integrations/moe.py:524), where its recomputation stopped in the shared expert
        (:meth:`recomputed_quirk`). The MoE's output ``experts(...) + shared_experts(residuals)``
        (deepseek :221, glm4_moe :391) runs the shared expert's backward first (the later node), so by
        then its gradients exist (full training: ``elements``, its gate/up/down_proj) and its saved
        tensors are freed (``freed``, per token); the experts' backward then runs what their forward
        ended with in reverse, :525-535: ``.to(hidden_states.dtype)``'s backward (the gradient to
        fp32, (T, h)), the sum's (an expand of it), the view's (a contiguous copy, (S, h)), the index's
        (zeros (S, h) the gradient is put into in place, torch/csrc/autograd/FunctionsManual.cpp
        ``index_backward``; out of place into a third (S, h) under any dispatch mode, the profiler's
        tracker included, which ``isTensorSubclassLike`` counts: the same bytes as this moment's; the
        copy freed with the index node, and ``inv_perm`` with it), then this
        product's: ``grad * sample_weights_g`` and ``grad * proj_out`` (MulBackward0,
        tools/autograd/derivatives.yaml ``mul.Tensor``), each (S, h) beside the incoming gradient
        (S, h), the three fp32 since the routing weights are (``_keep_in_fp32_modules_strict``, the
        router's fp32 weights: :meth:`moe_prefill`). Beside them the gradient of the layer's output
        down the residual stream and the shared expert's gradient of the MoE input, waiting for the
        experts' and the router's to be added to it, (T, h) each in the compute dtype (``working``,
        per token)."""
        p, h, k = setup.precision.compute_bytes, spec.hidden_size, spec.experts_per_token
        full = setup.mode is Mode.FULL
        shared = [lin for lin in self.moe_linears(spec) if not (lin.fused_experts or lin.router)]
        elements = sum(lin.params for lin in shared) if full else 0
        gated = 4 if full else 3  # as moe_saved's ``moe_shared``
        # and in full training the MoE's input, which only the shared expert's gate/up_proj save (the
        # experts' gather keeps its indices, the router's linear an fp32 copy of it)
        freed = _fields(spec)["n_shared_experts"] * spec.intermediate_size * p * gated + INT64 * k \
            + (p * h if full else 0)
        working = 3 * FP32 * k * h + 2 * p * h
        return elements, freed, working

    def moe_prefill(self, spec, setup) -> int:
        """The no-grad prefill's MoE layer working set (CUDA), at ``weighted_out[inv_perm]``
        (integrations/moe.py:424-537): the gathered inputs and the down output (S, h), the
        routing-weighted copy and its re-ordering, fp32 (S, h) each, since the routing weights are
        fp32 (the router computes in fp32 and ``proj_out * sample_weights_g`` promotes); the router's
        logits (kept in ``_``), its weights and indices, the sorted ids, ``perm``, ``inv_perm`` and
        the gathered weights; beside them the layer input (the model's loop variable, p x h)."""
        T, p, h = setup.batch * setup.seq, setup.precision.compute_bytes, spec.hidden_size
        S = spec.experts_per_token * T
        moe = (2 * p * h + 2 * FP32 * h) * S + (INT64 * 4 + 2 * FP32) * S + FP32 * spec.num_experts * T
        return p * h * T + moe


def checked_on_the_cuda_sim(setup, attention: set[str], device: Device = Device.CUDA) -> bool:
    """The setups the two families' memory terms were checked for against the CUDA sim (``device``
    CPU: against real CPU steps): full training, LoRA on ``attention`` (the attention projections'
    names) or all-linear, inference and an eval forward without a cache; bf16, sdpa, one device, no
    checkpointing, the HF Trainer's loop."""
    return setup.device is device and setup.attn is Attention.SDPA and setup.precision.value == "bf16" \
        and setup.sharding.value == "none" and not setup.grad_ckpt and setup.trainer.value == "hf" \
        and not setup.use_cache and setup.loop.value == "trainer" and (
            setup.mode is Mode.FULL or setup.mode is Mode.LORA and (set(setup.lora_targets) <= attention
                                                                    or _all_linear(setup.lora_targets))
            or setup.mode in (Mode.INFERENCE, Mode.EVAL))


def checked_with_checkpointing(setup, attention: set[str]) -> bool:
    """The checkpointed setups checked against the CUDA sim within 1 % (tests/test_glm4_moe.py,
    tests/test_deepseek_v3.py): full training and LoRA on ``attention`` or all-linear, otherwise as
    :func:`checked_on_the_cuda_sim` (the recomputed layer: :meth:`GroupedTopkMoE.recomputed_experts_backward`)."""
    return setup.grad_ckpt and setup.mode in (Mode.FULL, Mode.LORA) and setup.device is Device.CUDA \
        and checked_on_the_cuda_sim(setup.replace(grad_ckpt=False), attention)


def unchecked_sentence(spec, setup, family: str, what: str, attention: set[str], also: str = "") -> str:
    """The one sentence a setup :func:`checked_on_the_cuda_sim` does not take is refused with
    (``also``: what else a family lets through)."""
    return (f"{spec.name} ({family}): its parameters are counted exactly, but the memory of {what} is not modelled "
            f"yet for this setup ({setup.mode.value}, {setup.precision.value}, {setup.attn.value}, "
            f"{setup.device.value}), only for full training, LoRA on the attention projections "
            f"({', '.join(sorted(attention))}) or all-linear, inference and eval, in bf16 with sdpa on one CUDA GPU "
            f"without checkpointing or sharding{also}; measure it with `vramlab profile ... --backend sim`")


def _all_linear(targets) -> bool:
    """peft's "all-linear" (peft/tuners/tuners_utils.py; both spellings params.lora_targets takes)."""
    return tuple(t.lower() for t in targets) in (("all-linear",), ("all_linear",))


def _fields(spec) -> dict:
    return dict(spec.family_fields)
