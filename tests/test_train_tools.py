"""`ncfast train` as a tool: a user's own nn.Module (classifier rule, resume, DDP), TensorBoard
and CSV logs beside metrics.jsonl, and progress (tqdm on a terminal, lines in logs)."""

from __future__ import annotations

import csv
import io
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ncfast.train import ConfigError, load, run
from ncfast.train import checkpoint as ckpt
from ncfast.train.logs import scalars
from ncfast.train.report import Progress

# 10 Gaussian classes in R^16, 300 training samples in batches of 60: tiny, quick runs.
QUICK = ["data.name=gaussian", "data.gaussian_dim=16", "data.gaussian_train_per_class=30",
         "data.gaussian_test_per_class=10", "data.batch_size=60", "optim.lr=0.5",
         "epochs=2", "track.every=1", "progress=false", "track.nc4=false"]


def quick(tmp_path, *extra):
    return load(None, [*QUICK, f"runs_dir={tmp_path}", *extra])


class TwoHeads(nn.Module):
    """A user's model whose last registered nn.Linear is *not* the classifier."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(16, 24), nn.ReLU())
        self.classifier = nn.Linear(24, 10)
        self.aux = nn.Linear(24, 3)  # an auxiliary head, unused in forward

    def forward(self, x):
        return self.classifier(self.body(x))


class Plain(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 10))

    def forward(self, x):
        return self.net(x)


def nc_records(result):
    return [r for r in result.records if r["kind"] == "nc"]


def test_a_users_model_trains_with_nc_tracking_and_resumes_exactly(tmp_path):
    model = Plain()
    full = run(quick(tmp_path, "name=full"), model=model)
    last = nc_records(full)[-2]
    assert (last["epoch"], last["split"]) == (2, "train")
    # The rule: the last nn.Linear is the classifier whose input is tracked.
    assert last["weight_norm"] == pytest.approx(float(model.net[2].weight.detach().norm()))
    assert last["loss"] < nc_records(full)[0]["loss"]  # it trained

    run(quick(tmp_path, "name=cut", "epochs=1"), model=Plain())
    resumed = run(quick(tmp_path, "name=cut"), resume=True, model=Plain(seed=9))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
                        for r in rs]
    assert strip(resumed.records) == strip(full.records)


def test_the_classifier_rule_and_its_override(tmp_path):
    with pytest.raises(ConfigError, match=r"the classifier \(Linear\(in_features=24, "
                                          r"out_features=3, bias=True\)\) has 3 outputs, but "
                                          r"gaussian has 10 classes"):
        run(quick(tmp_path, "name=rule", "epochs=1"), model=TwoHeads())
    assert not (tmp_path / "rule").exists()
    model = TwoHeads()
    result = run(quick(tmp_path, "name=given", "epochs=1"), model=model,
                 classifier=model.classifier)
    assert nc_records(result)[-1]["weight_norm"] == pytest.approx(
        float(model.classifier.weight.detach().norm()))
    with pytest.raises(ValueError, match="classifier must be a module of model"):
        run(quick(tmp_path, "name=other", "epochs=1"), model=Plain(),
            classifier=nn.Linear(24, 10))
    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        run(quick(tmp_path, "name=bad", "epochs=1"), model=lambda x: x)


def _ddp_worker(rank, world, port, runs_dir, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    result = run(load(None, [*QUICK, f"runs_dir={runs_dir}", "name=two"]), model=Plain())
    torch.save(nc_records(result), f"{out}/{rank}.pt")


def test_a_users_model_under_two_process_ddp_gives_the_one_process_metrics(tmp_path):
    one = nc_records(run(quick(tmp_path, "name=one"), model=Plain()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in (0, 1):
        two = torch.load(tmp_path / f"{rank}.pt")
        assert len(two) == len(one) == 6
        for a, b in zip(one, two):
            assert (a["epoch"], a["split"], a["samples"]) == (b["epoch"], b["split"],
                                                              b["samples"])
            for key in ("accuracy", "loss", "nc1", "nc2_classifier", "nc3_dual", "cdnv"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)


class _Stop(Exception):
    pass


def _ddp_resume_worker(rank, world, ports, runs_dir, out):
    """Both processes stop at step 5 of epoch 1 (the checkpoint is that of step 3), then
    resume (a new process group, on a fresh port); the samples each progress.update was given
    are saved."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), OMP_NUM_THREADS="1")
    cfg = load(None, [*QUICK, f"runs_dir={runs_dir}", "name=resumed", "data.batch_size=20",
                      "epochs=1", "checkpoint_every_steps=3"])
    shown = []

    def update(self, epoch, epochs, batch, batches, samples, seconds, loss):
        if "resume" not in shown and batch == 5:
            raise _Stop
        shown.append((batch, samples))

    Progress.update = update
    try:
        run(cfg, model=Plain())
    except _Stop:
        pass
    shown.append("resume")
    os.environ["MASTER_PORT"] = str(ports[1])
    run(cfg, resume=True, model=Plain())
    torch.save(shown, f"{out}/{rank}.pt")


def test_progress_after_a_ddp_mid_epoch_resume_counts_the_samples_since_the_resume(tmp_path):
    # Rank 0 resumes with the checkpoint's sums over both processes: its samples/s once
    # counted those again, times the world size.
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = (a.getsockname()[1], b.getsockname()[1])
    mp.start_processes(_ddp_resume_worker, args=(2, ports, str(tmp_path), str(tmp_path)),
                       nprocs=2, start_method="spawn")
    expected = ([(batch, 20 * batch) for batch in range(1, 5)] + ["resume"]
                + [(batch, 20 * (batch - 3)) for batch in range(4, 16)])
    for rank in (0, 1):
        assert torch.load(tmp_path / f"{rank}.pt") == expected, rank


def read_csv(path):
    with open(path, newline="") as f:
        return [(int(r["epoch"]), r["tag"], float(r["value"])) for r in csv.DictReader(f)]


def expected_rows(records):
    return [(r["epoch"], tag, value) for r in records for tag, value in scalars(r).items()]


def test_tensorboard_and_csv_hold_what_metrics_jsonl_holds(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(quick(tmp_path, "name=logs", "epochs=1", "log=[csv, tensorboard]"))
    run(quick(tmp_path, "name=logs", "epochs=2", "log=[csv, tensorboard]"), resume=True)
    folder = tmp_path / "logs"
    records = ckpt.read_metrics(folder / "metrics.jsonl")
    rows = expected_rows(records)
    assert read_csv(folder / "metrics.csv") == rows
    assert {"nc/train/nc1", "nc/test/nc2_classifier", "train/loss", "train/lr"} <= \
        {tag for _, tag, _ in rows}
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    for tag in ("nc/train/nc1", "train/loss", "nc/test/accuracy"):
        want = [(epoch, value) for epoch, t, value in rows if t == tag]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_an_unknown_log_backend_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'log' must be a list of tensorboard, "
                                          r"csv, got \['wandb'\]"):
        quick(tmp_path, "log=[wandb]")


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["log-file", "terminal"])
def test_progress_reads_the_loss_without_warnings(stream):
    loss = torch.ones((), requires_grad=True) * 0.25  # as a training step leaves it
    progress = Progress(True, every=3, stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(1, 8):
            progress.update(1, 2, step, 7, 40 * step, 0.1 * step, loss)
        progress.epoch_done("epoch 1/2  loss 0.25")
    text = stream.getvalue()
    assert text.endswith("epoch 1/2  loss 0.25\n")
    if isinstance(stream, Terminal):
        assert "epoch 1/2" in text and "7/7" in text and "loss 0.25" in text  # tqdm's bar
    else:
        assert text.splitlines()[:2] == ["epoch 1/2 step 3/7  loss 0.25  400 samples/s",
                                         "epoch 1/2 step 6/7  loss 0.25  400 samples/s"]
        assert len(text.splitlines()) == 3
