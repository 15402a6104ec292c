"""`ncfast train` at scale: checkpoints every N steps with an exact mid-epoch resume, the training
order and per-sample augmentation seeds, NC tracking on a per-class subset, linear lr scaling
with warm-up, and the data.decode='cuda' path end to end (on the CPU here)."""

import pytest
import torch
from test_train import QUICK, killed_then_resumed, quick

from ncfast.train import ConfigError, load, run
from ncfast.train import checkpoint as ckpt
from ncfast.train.data import (SeededAugment, Splits, TrainOrder, class_subset, derived_seed,
                               epoch_batches, load_splits, loaders)
from ncfast.train.loop import peak_lr, warmup_factor


def test_resume_from_a_mid_epoch_checkpoint_ends_exactly_like_an_uninterrupted_run(tmp_path):
    """Checkpoints every 7 steps (150 steps an epoch, epoch-end checkpoints only at the end):
    the run is killed with SIGKILL after a mid-epoch checkpoint, during the per-step warm-up of
    a linearly scaled lr, and resumed from that step."""
    args = [*QUICK, f"runs_dir={tmp_path}", "epochs=3", "data.gaussian_train_per_class=150",
            "data.batch_size=10", "checkpoint_every=100", "checkpoint_every_steps=7",
            "optim.lr_reference_batch=5", "schedule.warmup_epochs=2"]
    saved = killed_then_resumed(tmp_path, args, lambda run: (run / "checkpoint.pt").is_file())
    assert 0 < saved["within_epoch"]["step"] < 150, "the checkpoint was written inside an epoch"
    final = ckpt.load(tmp_path / "killed" / "checkpoint.pt")
    assert final["within_epoch"] is None
    lrs = [r["lr"] for r in ckpt.read_metrics(tmp_path / "full" / "metrics.jsonl")
           if r["kind"] == "train"]
    assert lrs[0] == pytest.approx(0.75) and lrs[1:] == [1.0, 1.0], "warm-up from 0.5 to 1"


def test_checkpoints_every_n_steps_are_written_at_those_steps_only(tmp_path, monkeypatch):
    """20 steps an epoch, a checkpoint every 30 steps: inside epoch 2 (step 30), at the end of
    epoch 3 (step 60) and at the end of the run, none at other epoch ends."""
    saved = []
    save = ckpt.save

    def spy(path, payload, keep_previous=True):
        if path.name == ckpt.CHECKPOINT:
            within = payload["within_epoch"]
            saved.append((payload["epoch"], within and within["step"]))
        save(path, payload, keep_previous)

    monkeypatch.setattr(ckpt, "save", spy)
    run(quick(tmp_path, "epochs=4", "track.every=4", "checkpoint_every=100",
              "checkpoint_every_steps=30"))
    assert saved == [(1, 10), (3, None), (4, None)]


def stopped_after_a_checkpoint_inside_epoch(epoch: int, monkeypatch, train) -> None:
    """``train()``, stopped (as by a kill) right after its first checkpoint inside ``epoch``."""
    class Stopped(Exception):
        pass

    save = ckpt.save

    def save_then_stop(path, payload, keep_previous=True):
        save(path, payload, keep_previous)
        if payload["within_epoch"] is not None and payload["epoch"] == epoch - 1:
            raise Stopped

    monkeypatch.setattr(ckpt, "save", save_then_stop)
    with pytest.raises(Stopped):
        train()
    monkeypatch.setattr(ckpt, "save", save)


def test_resume_refuses_to_end_before_a_mid_epoch_checkpoint(tmp_path, monkeypatch):
    """A run stopped just after a checkpoint inside epoch 2, resumed with epochs=1: refused
    (it would train nothing and end on a partial epoch's weights); epochs=2 finishes it."""
    stopped_after_a_checkpoint_inside_epoch(2, monkeypatch, lambda: run(
        quick(tmp_path, "epochs=2", "checkpoint_every_steps=25")))
    with pytest.raises(ConfigError, match=r"cannot resume to epochs=1: the checkpoint is "
                                          r"inside epoch 2 \(after its step 5\)"):
        run(quick(tmp_path, "epochs=1", "checkpoint_every_steps=25"), resume=True)
    result = run(quick(tmp_path, "epochs=2", "checkpoint_every_steps=25"), resume=True)
    assert [r["epoch"] for r in result.records if r["kind"] == "train"] == [1, 2]


def test_a_mid_epoch_resume_restores_the_random_state_dropout_draws_from(tmp_path,
                                                                        monkeypatch):
    """A user's model with dropout (the global generator, every step), stopped just after a
    checkpoint inside epoch 2, during the warm-up, and resumed from another generator state:
    the same records and weights as the uninterrupted run."""
    from torch import nn
    from test_train import strip_times

    class Dropped(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3))
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.body(x))

    args = ["epochs=3", "checkpoint_every_steps=7", "optim.lr_reference_batch=20",
            "schedule.warmup_epochs=2"]
    full = run(quick(tmp_path, "name=full", *args), model=Dropped())
    stopped_after_a_checkpoint_inside_epoch(2, monkeypatch, lambda: run(
        quick(tmp_path, "name=cut", *args), model=Dropped()))
    torch.manual_seed(999)
    resumed = run(quick(tmp_path, "name=cut", *args), resume=True, model=Dropped())
    assert strip_times(resumed.records) == strip_times(full.records)
    a, b = (ckpt.load(tmp_path / name / ckpt.CHECKPOINT)["model"] for name in ("full", "cut"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_training_order_is_torch_distributed_samplers_and_resumes_at_a_position():
    from torch.utils.data import DistributedSampler

    n = 103
    for world in (1, 3):
        for rank in range(world):
            ours = TrainOrder(n, rank, world, seed=6)
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                     seed=6, drop_last=True)
            ours.set_epoch(4)
            ref.set_epoch(4)
            order = list(ours)
            assert order == list(ref) and len(ours) == len(ref)
            ours.set_epoch(4, start=10)
            assert list(ours) == order[10:]
    keyed = TrainOrder(n, 0, 1, seed=6, keyed=True)
    keyed.set_epoch(2)
    plain = TrainOrder(n, 0, 1, seed=6)
    plain.set_epoch(2)
    assert list(keyed) == [(i, 2) for i in plain]


def test_a_resumed_epoch_gets_the_rest_of_the_epochs_batches():
    """epoch_batches from step k (a mid-epoch resume) gives batches k, k+1, ... of the epoch,
    augmentations included, whatever the global generator holds; another epoch, another
    order."""
    class Noisy(torch.utils.data.Dataset):  # a randomly augmented data set
        def __len__(self):
            return 23

        def __getitem__(self, i):
            return torch.rand(3) + i, i % 2

    cfg = load(None, ["data.batch_size=4"]).data
    splits = Splits(Noisy(), Noisy(), Noisy(), 2, (3,))
    train = loaders(splits, cfg, 6, 0, 1, cuda=False)[0]
    whole = list(epoch_batches(train, 6, epoch=3))
    torch.manual_seed(123)
    rest = list(epoch_batches(train, 6, epoch=3, first_step=2))
    assert len(whole) == 6 and len(rest) == 4
    for (xa, ya), (xb, yb) in zip(whole[2:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(whole[0][0], next(epoch_batches(train, 6, epoch=4))[0])


def test_augmentation_seeds_are_per_sample_and_leave_the_callers_generator_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(3) + i

    data = SeededAugment(Noisy(), seed=6)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = data[(3, 1)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, data[(3, 1)])
    assert not torch.equal(a, data[(3, 2)]) and not torch.equal(a - 3, data[(2, 1)] - 2)
    assert len({derived_seed(6, e, i) for e in range(4) for i in range(1000)}) == 4000


def test_nc_tracking_on_a_fixed_per_class_subset(tmp_path):
    cfg = quick(tmp_path, "epochs=1", "track.every=1", "track.subset_per_class=5")
    result = run(cfg)
    samples = [(r["split"], r["samples"]) for r in result.records if r["kind"] == "nc"]
    assert samples == [("train", 50), ("test", 200)] * 2, "the test set stays whole"
    train_eval = load_splits(cfg.data, cfg.seed).train_eval
    subset = class_subset(train_eval, 5, seed=6)
    assert torch.bincount(subset.tensors[1]).tolist() == [5] * 10
    assert torch.equal(subset.tensors[0], class_subset(train_eval, 5, seed=6).tensors[0])
    assert not torch.equal(subset.tensors[0], class_subset(train_eval, 5, seed=7).tensors[0])
    assert class_subset(train_eval, 0, seed=6) is train_eval
    assert len(class_subset(train_eval, 1000, seed=6)) == 800, "small classes are kept whole"

    class Files(torch.utils.data.Dataset):  # an ImageFolder-like set: labels in .targets
        targets = [0, 1, 1, 2, 2, 2]

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return i, self.targets[i]

    picked = class_subset(Files(), 2, seed=1)
    assert sorted(y for _, y in picked) == [0, 1, 1, 2, 2]


def test_linear_lr_scaling_and_warm_up():
    cfg = load("imagenet-resnet50")
    assert (cfg.optim.lr, cfg.optim.lr_reference_batch, cfg.data.batch_size) == (0.1, 256, 1024)
    assert peak_lr(cfg) == pytest.approx(0.4) and cfg.schedule.warmup_epochs == 5
    steps = 1251
    factors = [warmup_factor(cfg, s, steps) for s in (0, 5 * steps // 2, 5 * steps - 1,
                                                     5 * steps)]
    assert factors[0] == pytest.approx(0.25, abs=1e-3), "from the unscaled lr, 0.1"
    assert factors[1] == pytest.approx(0.625, abs=1e-3) and factors[2:] == [1.0, 1.0]
    plain = load(None, [*QUICK, "schedule.warmup_epochs=2"])
    assert peak_lr(plain) == 0.5
    assert [warmup_factor(plain, s, 4) for s in range(9)] == [
        0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0]


def jpeg_tree(tmp_path, per_class: dict) -> None:
    """tmp_path/data/<split>/c0, c1: per_class[split] JPEGs each, portrait and landscape."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, count in per_class.items():
        for k in range(2):
            folder = tmp_path / "data" / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = (40, 56) if i % 2 else (56, 40)
                pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg")


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_gpu_decode_path_trains_end_to_end(tmp_path, device):
    """data.decode='cuda': the workers read the JPEG bytes, nvJPEG decodes (libjpeg on a CPU
    device), the device augmentation crops, a batch ahead on CUDA; NC tracking keeps the PIL
    path."""
    jpeg_tree(tmp_path, {"train": 6, "val": 2})
    args = [f"runs_dir={tmp_path}", "progress=false", "data.name=imagefolder",
            f"data.dir={tmp_path / 'data'}", "data.image_size=32", "data.augment=imagenet",
            "data.batch_size=4", "data.workers=1", "data.decode=cuda", "model.hidden=[16]",
            "optim.lr=0.01", "epochs=2", "track.every=2", f"device={device}"]
    result = run(load(None, args))
    train = [r for r in result.records if r["kind"] == "train"]
    assert len(train) == 2 and all(r["samples_per_s"] > 0 for r in train)
    assert result.final["train"]["samples"] == 12 and result.final["test"]["samples"] == 4
    with pytest.raises(ConfigError, match=r"'data.decode' may be 'cuda' for "
                                          r"data.name='imagefolder' \(JPEG files\) only, got "
                                          r"data.name='digits'"):
        load(None, ["data.decode=cuda"])
    with pytest.raises(ConfigError, match=r"'data.decode' = 'cuda' implements data.augment="
                                          r"'imagenet'.*got data.augment='auto' at "
                                          r"data.image_size=32"):
        run(load(None, [*args[:5], *args[6:], "name=crop-flip"]))


def test_a_step_that_raises_leaves_no_prefetch_thread_behind(tmp_path, monkeypatch):
    """data.decode='cuda' prepares batches a step ahead in a thread (on CUDA; forced here on
    the CPU). A run that diverges mid-epoch stops it, and with it the loader it reads, even
    while the caller still holds the error (and with it the epoch's frame)."""
    import threading

    from ncfast.train import gpu_decode
    from ncfast.train.loop import TrainingDiverged

    batches = gpu_decode.GpuPipeline.batches
    monkeypatch.setattr(gpu_decode.GpuPipeline, "batches",
                        lambda self, files, epoch, first_step, prefetch=None:
                        batches(self, files, epoch, first_step, prefetch=True))
    jpeg_tree(tmp_path, {"train": 8, "val": 1})
    with pytest.raises(TrainingDiverged) as diverged:
        run(load(None, [f"runs_dir={tmp_path}", "progress=false", "data.name=imagefolder",
                        f"data.dir={tmp_path / 'data'}", "data.image_size=32",
                        "data.augment=imagenet", "data.batch_size=2", "data.decode=cuda",
                        "model.hidden=[8]", "optim.lr=1e30", "checkpoint_every_steps=1",
                        "epochs=1", "device=cpu"]))
    assert "training diverged in epoch 1" in str(diverged.value)
    assert not [t for t in threading.enumerate() if t.name == "ncfast-gpu-decode"]


def test_gpu_decode_without_a_device_jpeg_decoder_is_refused_up_front(tmp_path, monkeypatch):
    """A torchvision that cannot decode JPEGs on the device (no nvJPEG) is a ConfigError before
    anything is written, not a run that decodes every batch on the CPU's fallback path."""
    import torchvision.io

    def no_decoder(*args, **kwargs):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    jpeg_tree(tmp_path, {"train": 2, "val": 1})
    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_decoder)
    with pytest.raises(ConfigError, match=r"'data.decode' = 'cuda' needs torchvision to decode "
                                          r"JPEGs on cpu \(nvJPEG\), which failed \(decode_jpegs"
                                          r"_cuda: torchvision not compiled with nvJPEG support\); "
                                          r"use data.decode='cpu'"):
        run(load(None, [f"runs_dir={tmp_path}", "progress=false", "data.name=imagefolder",
                        f"data.dir={tmp_path / 'data'}", "data.image_size=32",
                        "data.augment=imagenet", "data.batch_size=2", "data.decode=cuda",
                        "model.hidden=[8]", "epochs=1", "device=cpu"]))
    assert not (tmp_path / "digits").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss, precision", [("mse", "fp32"), ("ce", "bf16")])
def test_cuda_training_steps_read_nothing_back_from_the_device(tmp_path, loss, precision):
    """A training step (forward, loss, backward, SGD with a per-step warm-up, the running loss
    and accuracy sums) with batches already on the device, under
    torch.cuda.set_sync_debug_mode('error'): any host synchronisation inside it raises."""
    import ncfast
    from ncfast.train import loop
    from ncfast.train.models import build_model
    from ncfast.train.report import Progress

    cfg = quick(tmp_path, "device=cuda", f"loss.name={loss}", f"precision={precision}",
                "model.batch_norm=true", "schedule.warmup_epochs=1")
    device = torch.device("cuda")
    model = build_model(cfg.model, 10, (16,)).to(device)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(40, 16, generator=gen).to(device),
                torch.randint(0, 10, (40,), generator=gen).to(device)) for _ in range(4)]

    class Sampler:
        def set_epoch(self, epoch, start=0):
            pass

    class OnDevice:  # a training loader's interface; the steps run under the sync check
        batch_size, sampler = 40, Sampler()

        def __len__(self):
            return len(batches)

        def __iter__(self):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield from batches
            finally:
                torch.cuda.set_sync_debug_mode("default")

    try:
        with ncfast.cuda_target_checks(False):  # as run() trains
            seconds, loss_mean, accuracy, samples, lr = loop._train_epoch(
                cfg, model, params, OnDevice(), None, optimizer,
                torch.amp.GradScaler("cuda", enabled=False), loop.loss_function(cfg.loss),
                device, 1, Progress(False), loop._Dist(), None, lambda *args: None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert samples == 160 and lr == pytest.approx(0.1)  # the warm-up's last step: the peak
