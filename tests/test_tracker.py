"""Tests for profiler.measure.tracker.StorageTracker (CPU only, exact byte counts)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from estimator.categories import Category, Phase
from profiler.measure.tracker import PhaseRecord, StorageTracker, TrackerResults

#: Relative tolerance between the peak measured on real CPU tensors and the peak of
#: the same step under FakeTensorMode.
FAKE_VS_REAL_TOLERANCE = 0.01

F32 = torch.float32


def _mode(kind: str):
    return FakeTensorMode() if kind == "fake" else contextlib.nullcontext()


@pytest.fixture(params=["real", "fake"])
def kind(request):
    return request.param


def _nonzero(d: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in d.items() if v}


# --------------------------------------------------------------------- exact sequence
def test_exact_allocation_sequence(kind):
    with _mode(kind):
        tr = StorageTracker()
        with tr:
            a = torch.empty(1000, dtype=F32)  # +4000 -> 4000
            assert tr.current_bytes == 4000
            b = torch.empty(500, dtype=F32)  # +2000 -> 6000
            del a  # -4000 -> 2000
            assert tr.current_bytes == 2000
            c = torch.empty(1500, dtype=F32)  # +6000 -> 8000 (peak)
            d = torch.empty(10, 10, dtype=torch.float64)  # +800 -> 8800 (peak)
            del c  # -> 2800
            e = torch.empty(300, dtype=torch.bfloat16)  # +600 -> 3400
            if kind == "fake":
                assert isinstance(e, FakeTensor)
        assert tr.peak_bytes == 8800
        assert tr.current_bytes == 3400
        r = tr.results()
        assert r.peak_bytes == 8800 and r.current_bytes == 3400
        assert r.n_allocs == 5 and r.n_frees == 2 and r.live_storages == 3
        assert _nonzero(r.current_breakdown) == {"activations": 3400}
        del b, d, e
        assert tr.current_bytes == 0  # frees are still accounted after exit


def test_views_and_inplace_do_not_double_count(kind):
    with _mode(kind):
        tr = StorageTracker()
        with tr:
            a = torch.zeros(100, 10, dtype=F32)  # empty + zero_: one storage, 4000 B
            assert tr.current_bytes == 4000
            views = [a.view(1000), a.t(), a[::2], a[3], a.reshape(10, 100), a.unsqueeze(0),
                     a.as_strided((10,), (1,)), a.detach(), a.narrow(0, 5, 5), *a.chunk(4)]
            a.add_(1).mul_(2)
            a[0].fill_(3)
            assert tr.current_bytes == 4000
            assert tr.results().n_allocs == 1
            b = a.t().contiguous()  # a real copy: +4000
            assert tr.current_bytes == 8000
            del a
            assert tr.current_bytes == 8000  # the views keep a's storage alive
            del views
            assert tr.current_bytes == 4000
            del b
            assert tr.current_bytes == 0
        assert tr.peak_bytes == 8000


def test_resize_updates_bytes(kind):
    with _mode(kind):
        tr = StorageTracker()
        with tr:
            t = torch.empty(0, dtype=F32)
            assert tr.current_bytes == 0
            t.resize_(250)  # storage grows in place to 1000 B
            assert tr.current_bytes == 1000
            out = torch.empty(0, dtype=F32)
            torch.add(t, 1, out=out)  # out= resizes its (known) storage
            assert tr.current_bytes == 2000
        assert tr.peak_bytes == 2000


# --------------------------------------------------------------------- tagging
def test_tagging_moves_bytes_without_changing_totals():
    w = torch.empty(250, dtype=F32)  # 1000 B created before the tracker
    tr = StorageTracker()
    assert tr.track(w, Category.WEIGHTS) == 1000
    assert tr.track([w, w.view(5, 50), None], Category.WEIGHTS) == 1000  # idempotent
    assert tr.current_bytes == 1000 and tr.peak_bytes == 1000
    with tr:
        g = w * 2  # untagged -> default (activations), 1000 B
        tr.default_category = Category.TEMPORARIES
        t = torch.empty(50, dtype=F32)  # 200 B temporaries
        assert _nonzero(tr.bytes_by_category()) == {
            "weights": 1000, "activations": 1000, "temporaries": 200}
        tr.track({"grads": [g]}, Category.GRADIENTS)
        assert tr.category_of(g) == Category.GRADIENTS
        assert tr.category_of(g.view(10, 25)) == Category.GRADIENTS
        assert _nonzero(tr.bytes_by_category()) == {
            "weights": 1000, "gradients": 1000, "temporaries": 200}
        assert tr.current_bytes == 2200
        tr.track(g, None)  # category None leaves a known storage's tag alone
        assert tr.category_of(g) == Category.GRADIENTS
        del g
        assert _nonzero(tr.bytes_by_category()) == {"weights": 1000, "temporaries": 200}
    assert tr.peak_bytes == 2200
    assert tr.category_of(torch.empty(3)) is None
    del t


def test_track_module_and_custom_tag():
    model = torch.nn.Linear(10, 20)  # weight 800 B + bias 80 B
    model.register_buffer("scale", torch.ones(5))  # 20 B
    tr = StorageTracker()
    assert tr.track(model, Category.WEIGHTS) == 900
    tr.track(model.bias, "bias")  # any hashable works as a tag
    assert _nonzero(tr.bytes_by_category()) == {"weights": 820, "bias": 80}
    with pytest.raises(TypeError):
        tr.track(3.0)


# --------------------------------------------------------------------- phases
def test_phase_peaks_and_breakdown_at_peak(kind):
    with _mode(kind):
        w = torch.empty(1000, dtype=F32)  # 4000 B
        tr = StorageTracker()
        tr.track(w, Category.WEIGHTS)
        with tr:
            with tr.phase(Phase.FORWARD) as fwd:
                assert isinstance(fwd, PhaseRecord)
                a1 = torch.empty(500, dtype=F32)  # 6000
                a2 = torch.empty(250, dtype=F32)  # 7000
                tmp = torch.empty(750, dtype=F32)  # 10000  <- forward peak
                del tmp  # 7000
                a3 = torch.empty(100, dtype=F32)  # 7400
            tr.default_category = Category.TEMPORARIES
            with tr.phase(Phase.BACKWARD):
                t1 = torch.empty(200, dtype=F32)  # 8200
                del a1  # 6200
                g = torch.empty(1000, dtype=F32)  # 10200 <- backward & global peak
                tr.track(g, Category.GRADIENTS)  # after the peak: the snapshot keeps it as temporaries
                with tr.phase("inner"):  # nested phase
                    del t1  # 9400
                    x = torch.empty(50, dtype=F32)  # 9600 <- inner peak
                    del x
                del a2, a3  # 8000
            with tr.phase(Phase.OPTIMIZER):  # no allocation at all
                pass
        res = tr.results()
    assert isinstance(res, TrackerResults)
    f, b, inner, o = res.phases
    assert (f.name, f.index, f.start_bytes, f.peak_bytes, f.end_bytes) == ("forward", 0, 4000, 10000, 7400)
    assert _nonzero(f.peak_breakdown) == {"weights": 4000, "activations": 6000}
    assert _nonzero(f.end_breakdown) == {"weights": 4000, "activations": 3400}
    assert f.peak_delta == 6000
    assert (b.name, b.start_bytes, b.peak_bytes, b.end_bytes) == ("backward", 7400, 10200, 8000)
    assert _nonzero(b.peak_breakdown) == {"weights": 4000, "activations": 1400, "temporaries": 4800}
    assert (inner.name, inner.index, inner.start_bytes, inner.peak_bytes, inner.end_bytes) == (
        "inner", 2, 10200, 10200, 9400)
    assert _nonzero(b.end_breakdown) == {"weights": 4000, "gradients": 4000}
    assert (o.start_bytes, o.peak_bytes, o.end_bytes) == (8000, 8000, 8000)
    assert res.peak_bytes == 10200
    assert _nonzero(res.peak_breakdown) == {"weights": 4000, "activations": 1400, "temporaries": 4800}
    assert res.phase("backward") is not None and res.phase(Phase.FORWARD).peak_bytes == 10000
    d = res.to_dict()
    assert d["phases"][0]["peak_breakdown"]["activations"] == 6000
    assert all(type(v) is int for v in d["peak_breakdown"].values())
    del w, g


def test_inner_phase_peak_below_global_peak():
    tr = StorageTracker()
    with tr:
        big = torch.empty(1000, dtype=F32)  # 4000 global peak
        del big
        with tr.phase("small") as p:
            s = torch.empty(10, dtype=F32)  # 40 -> phase peak 40, global stays 4000
            s2 = torch.empty(5, dtype=F32)  # 60
            del s, s2
    assert (p.start_bytes, p.peak_bytes, p.end_bytes) == (0, 60, 0)
    assert _nonzero(tr.results().phases[0].peak_breakdown) == {"activations": 60}
    assert tr.peak_bytes == 4000
    tr.reset_peak()
    assert tr.peak_bytes == 0


# --------------------------------------------------------------------- timeline
def test_timeline_is_bounded_and_keeps_peak():
    tr = StorageTracker(record_timeline=True, max_timeline_points=64)
    with tr:
        keep = []
        for i in range(1000):
            keep.append(torch.empty(i % 7 + 1, dtype=F32))
            if len(keep) > 5:
                keep.pop(0)
        spike = torch.empty(10_000, dtype=F32)
        del spike
    tl = tr.results().timeline
    assert tl is not None and 2 <= len(tl) <= 64
    assert max(b for _, b in tl) == tr.peak_bytes
    idx = [i for i, _ in tl]
    assert idx == sorted(idx) and idx[-1] <= tr.n_allocs + tr.n_frees
    assert StorageTracker().results().timeline is None


def test_timeline_exact_when_short():
    tr = StorageTracker(record_timeline=True)
    with tr:
        a = torch.empty(10, dtype=F32)
        b = torch.empty(20, dtype=F32)
        del a
    assert tr.results().timeline == [(0, 40), (1, 120), (2, 80)]
    del b


# --------------------------------------------------------------------- clean exit
def test_exit_restores_mode_stack_and_stops_tracking():
    before = list(_get_current_dispatch_mode_stack())
    tr = StorageTracker()
    with tr:
        assert _get_current_dispatch_mode_stack()[-1] is tr and tr.active
        a = torch.empty(10, dtype=F32)
    assert list(_get_current_dispatch_mode_stack()) == before and not tr.active
    b = torch.empty(1000, dtype=F32)  # not seen
    assert tr.current_bytes == 40 and tr.results().n_allocs == 1
    with pytest.raises(RuntimeError):
        with tr:
            raise RuntimeError("boom")
    assert list(_get_current_dispatch_mode_stack()) == before
    with tr:  # re-entrant use keeps counting where it left off
        c = torch.empty(5, dtype=F32)
    assert tr.current_bytes == 60
    del a, b, c


def test_exit_inside_fake_mode_leaves_fake_mode_on_top():
    with FakeTensorMode() as fm:
        outer = list(_get_current_dispatch_mode_stack())
        with StorageTracker() as tr:
            assert _get_current_dispatch_mode_stack()[-1] is tr
            x = torch.empty(4, dtype=F32)
        assert list(_get_current_dispatch_mode_stack()) == outer
        y = torch.empty(4, dtype=F32)
        assert isinstance(x, FakeTensor) and isinstance(y, FakeTensor) and y.fake_mode is fm
        assert tr.current_bytes == 16


def test_fake_mode_entry_order_does_not_matter():
    def work(tr):
        a = torch.empty(1000, dtype=F32)  # 4000
        outs = [a + 1 for _ in range(3)]  # 3 x 4000 (the 2nd and 3rd are fake-cache hits)
        outs += [torch.nn.functional.linear(a.view(10, 100), torch.empty(100, 100)) for _ in range(2)]
        return tr.current_bytes, tr.peak_bytes, tr.n_allocs

    expected = (4000 + 3 * 4000 + 2 * 4000, 4000 + 3 * 4000 + 40000 + 4000 + 4000, 8)
    tr = StorageTracker()
    with FakeTensorMode(), tr:  # tracker inside the fake mode
        assert work(tr) == expected
    tr = StorageTracker()
    with tr, FakeTensorMode():  # FakeTensorMode is an infra mode: still dispatched below
        assert work(tr) == expected


def test_watch_hooks_tag_and_are_removed():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4, bias=False)  # 128 B of weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    tr = StorageTracker()
    tr.track(model, Category.WEIGHTS)
    tr.watch_grads(model)
    tr.watch_optimizer(opt)
    x = torch.randn(3, 8)
    with tr:
        model(x).sum().backward()
        assert tr.category_of(model.weight.grad) == Category.GRADIENTS
        tr.default_category = Category.TEMPORARIES
        with tr.phase(Phase.OPTIMIZER) as p:
            opt.step()
    # state: exp_avg + exp_avg_sq (128 B each) + step (4 B) tagged at creation
    assert tr.bytes_by_category()["optimizer_state"] == 260
    assert p.peak_breakdown["optimizer_state"] == 260
    assert tr.bytes_by_category()["gradients"] == 128
    tr.remove_hooks()
    assert "_init_group" not in vars(opt)
    assert not model.weight._post_accumulate_grad_hooks
    assert not opt._optimizer_step_post_hooks


# --------------------------------------------------------------------- fake vs real
def _train_step(model_fn, inputs_fn, watch: bool):
    torch.manual_seed(0)
    model = model_fn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    inputs = inputs_fn()
    tr = StorageTracker()
    tr.track(model, Category.WEIGHTS)
    if watch:
        tr.watch_grads(model)
        tr.watch_optimizer(opt)
    with tr:
        with tr.phase(Phase.FORWARD):
            loss = model(**inputs) if isinstance(inputs, dict) else model(inputs).float().pow(2).mean()
            if not isinstance(loss, torch.Tensor):
                loss = loss.loss
        tr.default_category = Category.TEMPORARIES
        with tr.phase(Phase.BACKWARD):
            loss.backward()
        tr.track([p.grad for p in model.parameters()], Category.GRADIENTS)
        del loss
        with tr.phase(Phase.OPTIMIZER):
            opt.step()
        tr.track(opt, Category.OPTIMIZER_STATE)
        with tr.phase(Phase.ZERO_GRAD):
            opt.zero_grad(set_to_none=True)
    tr.remove_hooks()
    return tr.results()


def _assert_close(real: TrackerResults, fake: TrackerResults):
    assert real.peak_bytes > 0
    assert abs(fake.peak_bytes - real.peak_bytes) <= FAKE_VS_REAL_TOLERANCE * real.peak_bytes
    for pr, pf in zip(real.phases, fake.phases, strict=True):
        assert pr.name == pf.name
        assert abs(pf.peak_bytes - pr.peak_bytes) <= FAKE_VS_REAL_TOLERANCE * pr.peak_bytes


def test_fake_matches_real_mlp():
    def model_fn():
        return torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64), torch.nn.LayerNorm(64))

    def inputs_fn():
        return torch.randn(32, 64)

    real = _train_step(model_fn, inputs_fn, watch=False)
    with FakeTensorMode():
        fake = _train_step(model_fn, inputs_fn, watch=False)
    _assert_close(real, fake)
    # weights: 64*256+256 + 256*64+64 + 64+64 = 33216 floats
    weights = 33216 * 4
    assert real.phases[0].start_bytes == weights
    # After zero_grad: weights + AdamW state (2 moments + 6 scalar steps).
    assert real.current_bytes == weights + 2 * weights + 6 * 4
    assert _nonzero(real.current_breakdown) == {"weights": weights, "optimizer_state": 2 * weights + 24}


@pytest.mark.parametrize("watch", [False, True])
def test_fake_matches_real_tiny_llama(watch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, max_position_embeddings=128)

    def model_fn():
        return transformers.LlamaForCausalLM(cfg)

    def inputs_fn():
        ids = torch.randint(0, 256, (2, 32))
        return {"input_ids": ids, "labels": ids}

    real = _train_step(model_fn, inputs_fn, watch)
    with FakeTensorMode():
        fake = _train_step(model_fn, inputs_fn, watch)
    _assert_close(real, fake)
    n_params = sum(p.numel() for p in model_fn().parameters())
    fwd, bwd, opt, zg = real.phases
    assert fwd.peak_breakdown["weights"] >= n_params * 4  # + the rotary inv_freq buffer
    assert opt.peak_breakdown["gradients"] == n_params * 4  # tagged before the step
    assert bwd.end_breakdown["gradients"] == (n_params * 4 if watch else 0)
    assert zg.end_breakdown["gradients"] == 0
    assert real.peak_bytes == max(p.peak_bytes for p in real.phases)
    if watch:  # AdamW moments are tagged as they are created
        assert opt.peak_breakdown["optimizer_state"] >= 2 * n_params * 4
