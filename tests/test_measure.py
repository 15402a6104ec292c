"""ncfast.measure on a small model: metrics equal the float64 reference on hooked features,
accuracy, eval mode restored, empty classes reported, and a 2-process gloo run equal to 1."""

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ncfast
from ncfast import metrics, reference


def make_model_and_data(K=4, d_in=6, d=5, n=30, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, d),
                          nn.ReLU(), nn.Linear(d, K))
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(K, d_in, generator=gen)
    labels = torch.arange(K).repeat_interleave(n)
    inputs = centres[labels] + torch.randn(K * n, d_in, generator=gen)
    # float64 end to end, so batching cannot move the features by float32 rounding
    return model.double(), inputs.double(), labels


def test_measure_matches_reference_on_hooked_features():
    model, inputs, labels = make_model_and_data()
    model.train()
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=17)
    result = ncfast.measure(model, loader, dtype=torch.float64)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        feats = model[:5](inputs).double()
        logits = model(inputs)
    W, b = model[5].weight.double(), model[5].bias.double()
    ref = reference.class_stats(feats, labels, 4, weight=W, bias=b)
    expected = metrics.all_metrics(ref, W, b)
    for name, value in result.metrics.as_dict().items():
        assert value == pytest.approx(getattr(expected, name), rel=1e-9, abs=1e-12), name
    assert result.accuracy == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    assert result.samples == len(labels) and result.empty_classes == []
    assert len(model[5]._forward_pre_hooks) == 0


@pytest.mark.parametrize("cache_bytes,forwards", [(2**30, 1), (600, 2), (0, 2)],
                         ids=["cached", "cache-overflows", "no-cache"])
def test_nc4_sweep_reuses_cached_features_within_the_budget(cache_bytes, forwards):
    model, inputs, labels = make_model_and_data()  # 120 x 5 float64 features: 4800 bytes
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=17)
    result = ncfast.measure(model, loader, dtype=torch.float64, cache_bytes=cache_bytes)
    assert len(calls) == forwards * len(loader)
    reference_run = ncfast.measure(model, loader, dtype=torch.float64, cache_bytes=0)
    assert result.metrics.as_dict() == reference_run.metrics.as_dict()
    assert result.stats.nc4_total.item() == len(labels)


def test_measure_rejects_a_bad_cache_budget():
    model, inputs, labels = make_model_and_data()
    model.train()
    with pytest.raises(ValueError, match="cache_bytes must be an int >= 0, got -1"):
        ncfast.measure(model, [(inputs, labels)], cache_bytes=-1)
    assert model.training and len(model[5]._forward_pre_hooks) == 0


def test_measure_reports_empty_classes_by_name():
    model, inputs, labels = make_model_and_data(K=5)
    keep = labels != 2
    loader = DataLoader(TensorDataset(inputs[keep], labels[keep]), batch_size=32)
    result = ncfast.measure(model, loader)
    assert result.empty_classes == [2]
    assert result.stats.counts[2].item() == 0


def test_measure_rejects_a_non_linear_classifier():
    model, inputs, labels = make_model_and_data()
    with pytest.raises(TypeError, match="classifier must be an nn.Linear, got ReLU"):
        ncfast.measure(model, [(inputs, labels)], classifier=model[2])


def _measure_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model, inputs, labels = make_model_and_data()
        shard = slice(rank, None, world)
        loader = DataLoader(TensorDataset(inputs[shard], labels[shard]), batch_size=9)
        out[rank] = ncfast.measure(model, loader, dtype=torch.float64).metrics.as_dict()
    finally:
        dist.destroy_process_group()


def test_two_process_measure_equals_one_process(tmp_path):
    model, inputs, labels = make_model_and_data()
    one = ncfast.measure(model, DataLoader(TensorDataset(inputs, labels), batch_size=9),
                         dtype=torch.float64).metrics.as_dict()
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(_measure_worker, args=(2, str(tmp_path / "store"), out), nprocs=2,
                           start_method="spawn")
        results = dict(out)
    for rank in (0, 1):
        for name, value in one.items():
            assert results[rank][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
