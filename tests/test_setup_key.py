"""Setup's cache keys (shape_free, per_sequence) are derived from its dataclass fields: a field
added to Setup is part of the key without anyone listing it."""
from __future__ import annotations

from dataclasses import make_dataclass

from estimator.setup import Setup


def test_a_new_field_changes_the_key():
    Extended = make_dataclass("Extended", [("extra", int, 0)], bases=(Setup,), frozen=True)
    a, b = Extended(batch=4, extra=1), Extended(batch=4, extra=2)
    assert a.shape_free is not b.shape_free and a.per_sequence is not b.per_sequence
    assert a.shape_free.extra == 1 and b.per_sequence.extra == 2
    assert Extended(batch=8, extra=1).shape_free is a.shape_free  # batch is not part of it


def test_keys_neutralise_what_no_term_reads():
    full = Setup(mode="full", batch=3, seq=256, lora_rank=64, lora_alpha=7)
    assert full.shape_free is Setup(mode="full", seq=9).shape_free  # batch, seq, LoRA fields of a full run
    assert full.per_sequence is Setup(mode="full", seq=256).per_sequence
    assert full.per_sequence is not Setup(mode="full", seq=512).per_sequence
    lora = Setup(mode="lora", lora_rank=64, lora_alpha=7)
    assert lora.shape_free is Setup(mode="lora", lora_rank=64).shape_free  # alpha moves no memory
    assert lora.shape_free is not Setup(mode="lora", lora_rank=8).shape_free
    assert Setup(new_tokens=5, mode="inference").shape_free is Setup(mode="inference").shape_free
