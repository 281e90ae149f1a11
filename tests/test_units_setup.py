"""Sizes (estimator/units.py) and the Setup's validation (estimator/setup.py)."""
from __future__ import annotations

import pytest

from estimator.setup import Attention, Device, Mode, Optimizer, OptimizerImpl, Precision, Quant, Setup, Sharding
from estimator.units import GB, GiB, KiB, MiB, format_bytes, format_gib, parse_bytes

# --- parse_bytes ------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 2**30),
    ("80GB", 80 * 10**9),
    ("1.5 MiB", 1_572_864),
    ("1.5MiB", 1_572_864),
    ("24 gib", 24 * 2**30),  # units are case-insensitive
    ("24GIB", 24 * 2**30),
    ("512", 512),  # a bare number is bytes
    ("512B", 512),
    ("0", 0),
    (".5GiB", 2**29),
    ("2TiB", 2 * 2**40),
    ("1TB", 10**12),
    ("3KiB", 3 * 1024),
    ("3kb", 3000),
    ("7MB", 7 * 10**6),
    ("  16 GiB  ", 16 * 2**30),
    (123, 123),
    (0, 0),
])
def test_parse_bytes(text, expected):
    value = parse_bytes(text)
    assert value == expected
    assert isinstance(value, int)


def test_unit_constants():
    assert (KiB, MiB, GiB, GB) == (1024, 1024**2, 1024**3, 10**9)


def test_bad_unit_lists_valid_units():
    with pytest.raises(ValueError, match=r"unknown size unit 'XB' in '24XB'; "
                                         r"valid units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"):
        parse_bytes("24XB")


@pytest.mark.parametrize("text", ["-1GiB", "-5", "", "GiB", "24 G iB", "1e9", "abc"])
def test_unreadable_size(text):
    with pytest.raises(ValueError, match="cannot read .* as a size: write a number and a unit"):
        parse_bytes(text)


def test_negative_int():
    with pytest.raises(ValueError, match="a size must not be negative, got -1"):
        parse_bytes(-1)


def test_format():
    assert format_gib(2**31) == "2.00 GiB"
    assert format_gib(3 * 2**29, digits=1) == "1.5 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(24 * GiB) == "24.00 GiB"
    assert format_bytes(3 * 2**40) == "3.00 TiB"


# --- Setup ------------------------------------------------------------------------------

def test_defaults():
    s = Setup()
    assert (s.mode, s.precision, s.optimizer, s.attn, s.device, s.sharding) == (
        Mode.FULL, Precision.BF16, Optimizer.ADAMW, Attention.SDPA, Device.CUDA, Sharding.NONE)
    assert (s.batch, s.seq, s.world_size, s.new_tokens) == (1, 512, 1, 0)
    assert s.lora_targets == ("q_proj", "v_proj")
    assert s.training


def test_strings_parse_to_enums():
    s = Setup(mode="LoRA", precision="AMP_BF16", optimizer="adamw_8bit", optimizer_impl="for_loop",
              attn="flash", device="cpu", lora_targets="q_proj, k_proj ,v_proj")
    assert s.mode is Mode.LORA
    assert s.precision is Precision.AMP_BF16
    assert s.optimizer is Optimizer.ADAMW_8BIT
    assert s.optimizer_impl is OptimizerImpl.FORLOOP
    assert s.lora_targets == ("q_proj", "k_proj", "v_proj")


def test_precision_bytes():
    assert [(p.value, p.param_bytes, p.compute_bytes) for p in Precision] == [
        ("fp32", 4, 4), ("fp16", 2, 2), ("bf16", 2, 2),
        ("amp-fp16", 4, 2), ("amp-bf16", 4, 2), ("mixed-bf16", 2, 2)]


def test_resolved_optimizer_impl():
    """torch/optim/optimizer.py::_default_to_fused_or_foreach: foreach on CUDA, for-loop on CPU."""
    assert Setup().resolved_optimizer_impl is OptimizerImpl.FOREACH
    assert Setup(device="cpu").resolved_optimizer_impl is OptimizerImpl.FORLOOP
    assert Setup(optimizer_impl="fused").resolved_optimizer_impl is OptimizerImpl.FUSED


def test_lora_alpha_default():
    assert Setup(mode="lora", lora_rank=8).alpha == 16
    assert Setup(mode="lora", lora_rank=8, lora_alpha=32).alpha == 32


def test_frozen():
    with pytest.raises(AttributeError):
        Setup().batch = 2  # type: ignore[misc]


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch=0), r"batch must be a positive integer, got 0"),
    (dict(batch=-3), r"batch must be a positive integer, got -3"),
    (dict(batch=True), r"batch must be a positive integer, got True"),
    (dict(batch=2.0), r"batch must be a positive integer, got 2.0"),
    (dict(seq=0), r"seq must be a positive integer, got 0"),
    (dict(world_size=0), r"world_size must be a positive integer, got 0"),
    (dict(new_tokens=-1), r"new_tokens must be a non-negative integer, got -1"),
    (dict(mode="lora", lora_rank=0), r"lora rank must be a positive integer, got 0"),
    (dict(mode="qlora", quant="nf4", lora_rank=-4), r"lora rank must be a positive integer, got -4"),
    (dict(mode="lora", lora_alpha=0), r"lora alpha must be positive, got 0"),
    (dict(mode="lora", lora_targets=""), r"lora targets are empty"),
    (dict(mode="qlora"), r"qlora needs a weight quantization: pass --quant nf4"),
    (dict(mode="full", quant="nf4"), r"quantization nf4 applies to inference and qlora only"),
    (dict(mode="lora", quant="int8"), r"quantization int8 applies to inference and qlora only"),
    (dict(world_size=4), r"world size 4 needs a sharding: ddp, zero1, zero2, zero3, fsdp, fsdp1 or fsdp1-shard"),
    (dict(mode="inference", world_size=2, sharding="zero3"), r"sharding applies to training"),
    (dict(optimizer="adamw-8bit", optimizer_impl="fused"), r"adamw-8bit \(bitsandbytes\) has no fused"),
    (dict(mode="train"), r"unknown mode 'train'; choose one of: inference, eval, full, lora, qlora"),
    (dict(precision="fp8"), r"unknown precision 'fp8'; choose one of: fp32, fp16, bf16, amp-fp16, "
                            r"amp-bf16, mixed-bf16"),
    (dict(quant="int4"), r"unknown quant 'int4'; choose one of: none, int8, nf4, nf4-dq"),
    (dict(optimizer="lion"), r"unknown optimizer 'lion'; choose one of: adamw, adamw-8bit"),
    (dict(attn="xformers"), r"unknown attention 'xformers'; choose one of: eager, sdpa, flash"),
    (dict(device="tpu"), r"unknown device 'tpu'; choose one of: cuda, cpu"),
    (dict(sharding="zero4"), r"unknown sharding 'zero4'; choose one of: none, ddp"),
])
def test_setup_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Setup(**kwargs)


def test_lora_fields_ignored_outside_lora():
    # rank and targets only matter for lora/qlora; a full setup does not validate them
    assert Setup(lora_rank=0, lora_targets=()).mode is Mode.FULL


def test_qlora_and_inference_quant_accepted():
    assert Setup(mode="qlora", quant="nf4-dq").quant is Quant.NF4_DQ
    assert Setup(mode="inference", quant="int8").quant is Quant.INT8


def test_to_dict_is_plain_json():
    s = Setup(mode="qlora", quant="nf4", lora_targets=("q_proj", "o_proj"), world_size=4, sharding="fsdp")
    d = s.to_dict()
    assert d["mode"] == "qlora" and d["quant"] == "nf4" and d["sharding"] == "fsdp"
    assert d["lora_targets"] == ["q_proj", "o_proj"]
    assert Setup.from_dict(d) == s


def test_from_dict_unknown_field():
    with pytest.raises(ValueError, match=r"unknown setup field\(s\): bogus, colour; known: "):
        Setup.from_dict({"batch": 2, "bogus": 1, "colour": "red"})


def test_replace_revalidates():
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        Setup().replace(batch=0)
