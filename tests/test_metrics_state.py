"""state_dict / load_state_dict of the second-pass accumulators (PerSampleStats, FeatureMean):
a restored state reads exactly as the original and keeps accumulating like it; a bad state is
refused, naming the entry, the rule and the value, and leaves the accumulator as it was."""

from __future__ import annotations

import re

import pytest
import torch

import ncfast
from ncfast import metrics, reference

F64 = torch.float64


def data(seed=0, K=5, d=6, n=60):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    y[:K] = torch.arange(K)
    h = 2.0 * torch.randn(K, d, generator=g, dtype=F64)[y] + torch.randn(n, d, generator=g,
                                                                           dtype=F64)
    return h, y, torch.randn(K, d, generator=g, dtype=F64)


def per_sample(stats, W):
    return metrics.PerSampleStats(stats, W, class_scatter=True, keep_margins=True,
                                  margin_bins=50, dtype=F64)


def readout(p):
    return (p.count, p.cosine_margin(), p.ncc_accuracy(), p.nf_ratio(centred=False),
            p.margins().tolist(), p.margin_histogram()[1].tolist())


def test_per_sample_state_round_trip_continues_exactly():
    h, y, W = data()
    s = reference.class_stats(h, y, 5)
    whole = per_sample(s, W)
    whole.update(h[:40], y[:40])
    restored = per_sample(s, W)
    restored.load_state_dict(whole.state_dict())
    assert readout(restored) == readout(whole)
    for p in (whole, restored):
        p.update(h[40:], y[40:])
    assert readout(restored) == readout(whole)
    # the float64 two-pass value of the whole data
    want = torch.cdist(h, s.means).argmin(1).eq(y).double().mean().item()
    assert restored.ncc_accuracy() == pytest.approx(want, rel=1e-12)


def test_feature_mean_state_round_trip_continues_exactly():
    h, _, _ = data(seed=1)
    a = metrics.FeatureMean(6)
    empty = metrics.FeatureMean(6)
    empty.load_state_dict(a.state_dict())
    assert empty.count == 0
    a.update(h[:25])
    b = metrics.FeatureMean(6)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.update(h[25:])
    assert b.count == a.count == 60
    assert torch.equal(b.mean, a.mean)
    torch.testing.assert_close(b.mean, h.mean(0), rtol=1e-13, atol=1e-13)


def bad_states():
    h, y, W = data()
    s = reference.class_stats(h, y, 5)
    p = per_sample(s, W)
    p.update(h, y)
    good = p.state_dict()
    other = reference.class_stats(h[:30], y[:30], 5)

    def edit(**changes):
        state = dict(good)
        state.update(changes)
        return state

    def without(key):
        return {k: v for k, v in good.items() if k != key}

    nan = good["class_sum"].clone()
    nan[1, 2] = float("nan")
    return s, W, {
        "not-a-dict": ([good], TypeError, "state must be a dict (from state_dict()), got list"),
        "version": (edit(version=7), ValueError,
                    "expected a PerSampleStats state of version 1, got version 7"),
        "missing": (without("margin_hist"), ValueError,
                    "state lacks the entries ['margin_hist']"),
        "option": (edit(settings={**good["settings"], "margin": "official"}), ValueError,
                   "state['settings']['margin'] must be 'centred' (this accumulator's "
                   "setting), got 'official'"),
        "shape": (edit(margin_hist=good["margin_hist"][:10]), ValueError,
                  "state['margin_hist'] must have shape [50], got [10]"),
        "dtype": (edit(class_sum=good["class_sum"].half()), TypeError,
                  "state['class_sum'] must have dtype torch.float32 or torch.float64, got "
                  "torch.float16"),
        "negative": (edit(count=torch.tensor(-1)), ValueError,
                     "state['count'] must be >= 0, got -1"),
        "nan": (edit(class_sum=nan), ValueError,
                "state['class_sum'] must be finite in torch.float64, got NaN or Inf"),
        "other-means": (edit(means=other.means.clone()), ValueError,
                        "state['means'] must equal the means this accumulator was built from"),
        "totals": (edit(count=good["count"] + 1), ValueError,
                   "state['margin_hist'] must count == state['count'] (61) samples, got 60"),
        # the samples equal to μ_G have no bin: histogram + them = count
        "undefined-totals": (edit(margin_undefined=torch.tensor(1)), ValueError,
                             "state['margin_hist'] must count == state['count'] (60) samples, "
                             "got 61"),
    }


@pytest.mark.parametrize("name", list(bad_states()[2]))
def test_per_sample_bad_state_is_refused_and_changes_nothing(name):
    s, W, cases = bad_states()
    state, exc, message = cases[name]
    h, y, _ = data(seed=2)
    p = per_sample(s, W)
    p.update(h[:20], y[:20])
    before = readout(p)
    with pytest.raises(exc, match="^ncfast.metrics.PerSampleStats.load_state_dict: "
                       + re.escape(message) + "$"):
        p.load_state_dict(state)
    assert readout(p) == before


@pytest.mark.parametrize("change, exc, message", [
    ({"settings": {"dim": 4}}, ValueError,
     "state['settings']['dim'] must be 6 (this accumulator's setting), got 4"),
    ({"sum": torch.full((6,), float("inf"), dtype=F64)}, ValueError,
     "state['sum'] must be finite in torch.float64, got NaN or Inf"),
    ({"shift": torch.zeros(5, dtype=F64)}, ValueError,
     "state['shift'] must have shape [6], got [5]"),
    ({"count": torch.tensor(2.0)}, TypeError,
     "state['count'] must have dtype torch.int64 or torch.int32, got torch.float32"),
], ids=["dim", "inf-sum", "shift-shape", "float-count"])
def test_feature_mean_bad_state_is_refused_and_changes_nothing(change, exc, message):
    h, _, _ = data(seed=3)
    m = metrics.FeatureMean(6)
    m.update(h)
    before = (m.count, m.mean.clone())
    state = {**m.state_dict(), **change}
    with pytest.raises(exc, match="^ncfast.metrics.FeatureMean.load_state_dict: "
                       + re.escape(message) + "$"):
        m.load_state_dict(state)
    assert m.count == before[0] and torch.equal(m.mean, before[1])


def test_class_stats_state_keeps_its_messages():
    s = ncfast.ClassStats(5, 6)
    state = s.state_dict()
    state["gram"] = state["gram"][:3]
    with pytest.raises(ValueError, match=re.escape(
            "ncfast.ClassStats.load_state_dict: state['gram'] must have shape [6, 6], got "
            "[3, 6]")):
        s.load_state_dict(state)


def test_all_reduce_without_a_process_group_is_a_no_op():
    """As ClassStats.all_reduce (and torchmetrics): one process has nothing to combine, so the
    same code runs with and without torch.distributed (both raised RuntimeError)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    h, y, W = data()
    p = per_sample(reference.class_stats(h, y, 5), W)
    p.update(h, y)
    m = metrics.FeatureMean(6)
    m.update(h)
    before = (readout(p), m.count, m.mean.clone())
    assert p.all_reduce() is p and m.all_reduce() is m
    assert (readout(p), m.count) == before[:2] and torch.equal(m.mean, before[2])


def test_merge_refuses_another_type_or_dim():
    m = metrics.FeatureMean(6)
    with pytest.raises(TypeError, match=r"^ncfast.metrics.FeatureMean.merge: other must be a "
                                        r"FeatureMean, got ClassStats$"):
        m.merge(ncfast.ClassStats(5, 6))  # a ValueError, unlike every other merge's TypeError
    with pytest.raises(ValueError, match=r"other must be a FeatureMean of dim 6, got "
                                         r"FeatureMean\(dim=4"):
        m.merge(metrics.FeatureMean(4))


def test_samples_equal_to_the_global_mean_leave_only_the_margin_undefined(device):
    """A feature equal to μ_G (a dead network's zero features, say) has no cosine: update raised
    in the middle of a sweep; now it is counted, the margin's read-outs say how many, the other
    metrics are unaffected, and the count survives merge and a state_dict round trip."""
    h, y, W = data()
    s = reference.class_stats(h, y, 5)
    h = h.clone()
    h[[3, 17]] = s.global_mean("weighted")

    def per_sample(stats, W):
        return metrics.PerSampleStats(stats, W, class_scatter=True, keep_margins=True,
                                      margin_bins=50, dtype=F64, device=device)

    a, b = per_sample(s, W), per_sample(s, W)
    a.update(h[:30].to(device), y[:30].to(device))
    b.update(h[30:].to(device), y[30:].to(device))
    a.merge(b)
    restored = per_sample(s, W)
    restored.load_state_dict(a.state_dict())
    reason = "2 of 60 samples equal the global mean; their cosine margin is undefined"
    for p in (a, restored):
        for read in ("cosine_margin", "margins", "margin_histogram"):
            with pytest.raises(ValueError, match="^" + re.escape(
                    f"ncfast.metrics.PerSampleStats.{read}: {reason}") + "$"):
                getattr(p, read)()
        want = torch.cdist(h, s.means).argmin(1).eq(y).double().mean().item()
        assert p.count == 60 and p.ncc_accuracy() == pytest.approx(want, rel=1e-12)
    # without those two samples the margins are as before
    keep = torch.ones(60, dtype=torch.bool)
    keep[[3, 17]] = False
    clean = per_sample(s, W)
    clean.update(h[keep].to(device), y[keep].to(device))
    state = a.state_dict()
    assert torch.equal(state["margin_hist"], clean.state_dict()["margin_hist"])
    torch.testing.assert_close(state["margins"].sort().values, clean.margins(), rtol=1e-12,
                               atol=1e-12)  # other batches: a GPU matmul may round otherwise
    # a state saved before the count existed loads as one without such samples
    old = clean.state_dict()
    del old["margin_undefined"]
    again = per_sample(s, W)
    again.load_state_dict(old)
    assert readout(again) == readout(clean)
