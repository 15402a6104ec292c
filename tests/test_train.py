"""`ncfast train`: config handling, presets, models (theory.md 6.3's parameter counts), the run
folder and its safety rules, exact resume after SIGKILL, DDP equivalence, the digits default."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ncfast.train import ConfigError, list_presets, load, run
from ncfast.train import checkpoint as ckpt
from ncfast.train.config import TrainConfig, all_keys, dump
from ncfast.train.loop import TrainingDiverged
from ncfast.train.models import build_model, simplex_etf

# A small, quick run: 10 Gaussian classes in R^16, an MLP without BatchNorm (so 1 and 2 processes
# compute the same steps), 800 training samples in batches of 40.
QUICK = ["data.name=gaussian", "data.gaussian_dim=16", "data.gaussian_train_per_class=80",
         "data.gaussian_test_per_class=20", "data.batch_size=40", "model.hidden=[32]",
         "model.batch_norm=false", "optim.lr=0.5", "epochs=4", "track.every=2", "progress=false"]


def quick(tmp_path, *extra) -> TrainConfig:
    return load(None, [*QUICK, f"runs_dir={tmp_path}", *extra])


def folder_bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ncfast", "train", *args], capture_output=True,
                          text=True, **kw)


def strip_times(records):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
            for r in records]


# ------------------------------------------------------------------------------- config

def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; did you mean "
                                          r"'optim.lr'\?"):
        load(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lr'; did you mean 'optim.lr'"):
        load(None, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.nmae'; did you mean "
                                          r"'data.name'"):
        load(None, {"data.nmae": "digits"})


def test_values_are_typed_and_checked():
    cfg = load(None, ["optim.lr=0.25", "model.hidden=[8, 4]", "track.test=false", "epochs=3"])
    assert (cfg.optim.lr, cfg.model.hidden, cfg.track.test, cfg.epochs) == (0.25, [8, 4], False, 3)
    with pytest.raises(ConfigError, match=r"config key 'epochs' must be int, got 'many'"):
        load(None, ["epochs=many"])
    with pytest.raises(ConfigError, match=r"config key 'optim.name' must be one of sgd, adam, "
                                          r"adamw, lbfgs, got 'rmsprop'"):
        load(None, ["optim.name=rmsprop"])
    with pytest.raises(ConfigError, match=r"config key 'epochs' must be in \[1, 2\^31 - 1\], "
                                          r"got 0"):
        load(None, ["epochs=0"])
    with pytest.raises(ConfigError, match=r"use loss.name='rescaled_mse' to set loss.k=5"):
        load(None, ["loss.k=5"])
    with pytest.raises(ConfigError, match=r"override 'epochs' must be key=value"):
        load(None, ["epochs"])


def test_yaml_file_and_saved_config_round_trip(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("epochs: 7\noptim:\n  lr: 0.125\nloss:\n  name: rescaled_mse\n  k: 2\n")
    cfg = load(str(path), ["optim.momentum=0.5"])
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.momentum, cfg.loss.k) == (7, 0.125, 0.5, 2.0)
    again = tmp_path / "again.yaml"
    again.write_text(dump(cfg))
    assert load(str(again)) == cfg
    path.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load(str(path))
    with pytest.raises(ConfigError, match=r"config file 'cifar10-resnet18-sdg' does not exist "
                                          r"and is not a preset name; did you mean preset "
                                          r"'cifar10-resnet18-sgd'"):
        load("cifar10-resnet18-sdg")


def test_every_preset_loads_and_is_listed():
    presets = list_presets()
    expected = {"digits", "cifar10-resnet18-sgd", "cifar10-resnet18-adam",
                "cifar10-resnet18-lbfgs", "cifar10-resnet18-etf-d10", "cifar10-resnet18-d5",
                "cifar10-resnet18-d8", "cifar10-resnet18-d9", "miniimagenet-resnet18-k20",
                "miniimagenet-resnet18-M10", "imagenet-resnet50"}
    assert expected <= set(presets)
    for name in presets:
        cfg = load(name)
        assert cfg.name == name and cfg.about
    assert load("digits") == load(None, ["about=" + load("digits").about]), \
        "the digits preset is the default run"
    assert load("cifar10-resnet18-lbfgs").optim.name == "lbfgs"
    assert load("miniimagenet-resnet18-k15").loss.k == 15.0
    listed = cli("--list-presets")
    assert listed.returncode == 0 and all(name in listed.stdout for name in presets)
    assert "optim.lr" in all_keys()
    # flags and overrides in any order
    missing = cli("epochs=1", "--config", "cifar10-resnet18-sgd", "data.download=false",
                  "--data-dir", "/nonexistent/cifar")
    assert missing.returncode != 0
    assert "data.dir='/nonexistent/cifar'" in missing.stderr and "data.download=true" in \
        missing.stderr


# ------------------------------------------------------------------------------- models

@pytest.mark.parametrize("feature_dim, fixed_etf, total, trainable", [
    (0, False, 11_173_962, 11_173_962),
    (10, False, 8_859_862, 8_859_862),
    (10, True, 8_859_862, 8_859_762),
], ids=["d512", "d10", "d10-etf"])
def test_resnet18_parameter_counts_of_theory_6_3(feature_dim, fixed_etf, total, trainable):
    cfg = load(None, ["model.arch=resnet18", "model.stem=cifar", f"model.feature_dim={feature_dim}",
                      f"model.fixed_etf={fixed_etf}"]).model
    model = build_model(cfg, 10, (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("K, d", [(10, 10), (10, 512), (10, 9), (3, 2)])
def test_simplex_etf(K, d):
    W = simplex_etf(K, d).double()
    expected = K / (K - 1) * (torch.eye(K, dtype=torch.float64) - 1.0 / K)
    torch.testing.assert_close(W @ W.T, expected, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"needs num_classes >= 2 and feature dimension "
                                          r"d >= K-1 = 9, got K=10, d=8"):
        simplex_etf(10, 8)


def test_other_architectures_build_and_run():
    small = torch.randn(2, 3, 32, 32)
    r50 = build_model(load(None, ["model.arch=resnet50", "model.stem=imagenet",
                                  "model.feature_dim=64"]).model, 7, (3, 32, 32))
    assert r50(small).shape == (2, 7) and r50.fc.in_features == 64
    wrn = build_model(load(None, ["model.arch=wrn28_10"]).model, 10, (3, 32, 32))
    assert round(sum(p.numel() for p in wrn.parameters()) / 1e6, 1) == 36.5
    with pytest.raises(ConfigError, match=r"needs image inputs \(C, H, W\), got inputs of "
                                          r"shape \[64\]"):
        build_model(load(None, ["model.arch=resnet18"]).model, 10, (64,))


# ------------------------------------------------------------------------------- runs

def test_run_writes_the_folder_and_tracks_collapse(tmp_path):
    result = run(quick(tmp_path))
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt", "nc.png"} <= files
    assert load(str(result.run_dir / "config.yaml")) == quick(tmp_path)
    records = ckpt.read_metrics(result.run_dir / "metrics.jsonl")
    assert records == result.records
    nc = [(r["epoch"], r["split"]) for r in records if r["kind"] == "nc"]
    assert nc == [(e, s) for e in (0, 2, 4) for s in ("train", "test")]
    assert [r["epoch"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    first, last = records[0], result.final["train"]
    assert first["samples"] == 800 and result.final["test"]["samples"] == 200
    assert last["nc1"] < first["nc1"] and last["accuracy"] > 0.9
    for key in ("nc2_means", "nc2_classifier", "nc3_dual", "nc4", "cdnv", "bias_norm", "loss",
                "feature_norm", "weight_norm"):
        assert isinstance(last[key], float), key


def test_existing_run_folder_is_never_overwritten_silently(tmp_path):
    cfg = quick(tmp_path, "epochs=1")
    run(cfg)
    run_dir = tmp_path / cfg.name
    before = folder_bytes(run_dir)
    with pytest.raises(ConfigError, match=r"already exists; pass --resume to continue it, "
                                          r"--overwrite to replace it"):
        run(cfg)
    assert folder_bytes(run_dir) == before
    run(quick(tmp_path, "epochs=2"), overwrite=True)
    assert [r["epoch"] for r in ckpt.read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "train"] == [1, 2]


def test_bad_input_leaves_the_run_folder_as_it_was(tmp_path):
    cfg = quick(tmp_path, "epochs=1")
    run(cfg)
    run_dir = tmp_path / cfg.name
    before = folder_bytes(run_dir)
    # a label count that disagrees with the data
    with pytest.raises(ConfigError, match=r"data.num_classes=5 disagrees with the data: "
                                          r"data.name='digits' has 10 classes"):
        run(quick(tmp_path, "epochs=1", "data.num_classes=5", "data.name=digits"),
            overwrite=True)
    # a missing data path (torchvision data set, no download asked)
    with pytest.raises(ConfigError, match=r"data.name='cifar10': no usable data set under "
                                          r"data.dir='.*nowhere'.*data.download=true"):
        run(quick(tmp_path, "data.name=cifar10", f"data.dir={tmp_path / 'nowhere'}"),
            overwrite=True)
    # a corrupt checkpoint
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = folder_bytes(run_dir)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint '.*checkpoint.pt' is corrupt or "
                                                   r"unreadable.*the run folder is unchanged"):
        run(quick(tmp_path, "epochs=2"), resume=True)
    # resuming with another config
    run(quick(tmp_path, "epochs=1"), overwrite=True)
    before = folder_bytes(run_dir)
    with pytest.raises(ConfigError, match=r"cannot resume with a different config "
                                          r"\(optim.lr: 0.5 -> 0.1\)"):
        run(quick(tmp_path, "epochs=2", "optim.lr=0.1"), resume=True)
    assert folder_bytes(run_dir) == before
    with pytest.raises(ckpt.CheckpointError, match="cannot resume: no checkpoint at"):
        run(quick(tmp_path, "name=never-ran"), resume=True)
    assert not (tmp_path / "never-ran").exists()


@pytest.mark.parametrize("every_steps", [0, 1], ids=["epoch-ends", "every-step"])
def test_divergence_is_an_error_that_keeps_the_last_checkpoint(tmp_path, every_steps):
    """No checkpoint (an epoch's end, or one every N steps) is written once the run has
    diverged: the last one written holds a finite network."""
    with pytest.raises(TrainingDiverged, match=r"training diverged in epoch 1: the mean "
                                               r"training loss is (nan|inf); lower optim.lr.*"
                                               r"keeps its last checkpoint, written before"):
        run(quick(tmp_path, "optim.lr=1e6", "loss.normalize=sample",
                  f"checkpoint_every_steps={every_steps}"))
    written = sorted((tmp_path / "digits").glob("checkpoint*.pt"))
    assert len(written) == (2 if every_steps else 0)  # those of the first, finite steps
    for path in written:
        state = ckpt.load_kept(path)["model"]
        assert all(bool(t.isfinite().all()) for t in state.values()), path.name


def killed_then_resumed(tmp_path, args, ready) -> dict:
    """Train ``args`` to the end as name=full, and as name=killed: SIGKILL once ``ready(run
    folder)`` holds and a few steps more, then --resume. Both must end alike, bit for bit
    (metrics but their timings, and the weights). Returns the checkpoint it resumed from."""
    full = cli(*args, "name=full", timeout=300)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([sys.executable, "-m", "ncfast", "train", *args, "name=killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not ready(killed):
        time.sleep(0.01)
    time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = ckpt.load(killed / "checkpoint.pt")
    resumed = cli(*args, "name=killed", "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = ckpt.read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = ckpt.read_metrics(killed / "metrics.jsonl")
    assert strip_times(a) == strip_times(b)
    state_a = ckpt.load(tmp_path / "full" / "checkpoint.pt")["model"]
    state_b = ckpt.load(killed / "checkpoint.pt")["model"]
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    return saved


def test_resume_after_sigkill_mid_epoch_ends_exactly_like_an_uninterrupted_run(tmp_path):
    args = [*QUICK, f"runs_dir={tmp_path}", "epochs=4", "data.gaussian_train_per_class=150",
            "data.batch_size=10"]

    def in_epoch_2(run):
        metrics = run / "metrics.jsonl"
        return metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 1

    assert killed_then_resumed(tmp_path, args, in_epoch_2)["epoch"] < 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("batch_norm", [False, True], ids=["mlp", "mlp-batchnorm"])
def test_two_process_gloo_run_matches_one_process(tmp_path, batch_norm):
    """With BatchNorm the two processes normalise over the global batch (model.sync_batch_norm,
    GlobalBatchNorm on CPU), so they train the one-process network."""
    args = [*QUICK, f"runs_dir={tmp_path}", "epochs=3", "track.every=3",
            f"model.batch_norm={batch_norm}"]
    single = cli(*args, "name=one", timeout=300)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "ncfast", "train", *args,
                          "name=two"], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a = [r for r in ckpt.read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "nc"]
    b = [r for r in ckpt.read_metrics(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "nc"]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert (ra["epoch"], ra["split"], ra["samples"]) == (rb["epoch"], rb["split"],
                                                             rb["samples"])
        for key in ("accuracy", "loss", "nc1", "nc2_means", "nc2_classifier", "nc3_dual", "nc4",
                    "cdnv", "bias_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["epoch"], key)


@pytest.mark.parametrize("extra", [
    ["optim.name=adam", "optim.lr=1e-3", "schedule.name=cosine"],
    ["optim.name=adamw", "optim.lr=1e-3", "loss.name=ce"],
    ["optim.name=lbfgs", "optim.lr=0.5", "optim.lbfgs_max_iter=4", "data.batch_size=400"],
    ["loss.name=rescaled_mse", "loss.k=3", "loss.M=2", "loss.normalize=sample", "optim.lr=0.05"],
], ids=["adam-cosine", "adamw-ce", "lbfgs", "rescaled"])
def test_optimisers_and_losses_train(tmp_path, extra):
    result = run(quick(tmp_path, "epochs=2", "track.every=2", *extra))
    first = [r for r in result.records if r["kind"] == "nc"][0]
    assert result.final["train"]["loss"] < first["loss"]


def test_fixed_etf_classifier_is_not_trained_but_its_bias_is(tmp_path):
    result = run(quick(tmp_path, "epochs=2", "model.fixed_etf=true", "model.hidden=[16]",
                       "model.feature_dim=10"))
    state = ckpt.load(result.run_dir / "checkpoint.pt")["model"]
    torch.testing.assert_close(state["fc.weight"], simplex_etf(10, 10), rtol=0, atol=0)
    assert state["fc.bias"].abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1], ids=["seed0", "seed1"])
def test_default_digits_run_shows_every_nc_property_collapsing(tmp_path, seed):
    """The README's main job, as `make run` trains it: NC1 falls >= 100x, NC2 (class means and
    classifier) and the paper's NC3 >= 10x from epoch 0, test accuracy >= 97%
    (ncfast.experiments.default_run checks seeds 0-3 with 1 and 2 threads)."""
    from ncfast.experiments.default_run import checks

    result = run(load(None, [f"runs_dir={tmp_path}", "progress=false", f"seed={seed}"]))
    failed = [str(c) for c in checks(result.records) if not c.ok]
    assert failed == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_run(tmp_path, precision):
    result = run(quick(tmp_path, "device=cuda", f"precision={precision}", "loss.name=rescaled_mse",
                       "loss.k=2", "model.batch_norm=true"))
    first = [r for r in result.records if r["kind"] == "nc"][0]
    assert result.final["train"]["nc1"] < first["nc1"] and result.final["train"]["accuracy"] > 0.9


def test_reduced_precision_on_cpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"precision='bf16' needs CUDA"):
        run(quick(tmp_path, "device=cpu", "precision=bf16"))
    assert not any(tmp_path.iterdir()), "nothing is written before the config is accepted"


def test_compiled_deterministic_run_agrees_with_eager(tmp_path):
    eager = run(quick(tmp_path, "epochs=2", "deterministic=true", "name=eager"))
    compiled = run(quick(tmp_path, "epochs=2", "deterministic=true", "compile=true",
                         "name=compiled"))
    for split in ("train", "test"):
        for key in ("accuracy", "loss", "nc1"):
            assert compiled.final[split][key] == pytest.approx(eager.final[split][key],
                                                               rel=1e-3, abs=1e-6), (split, key)
    assert not torch.are_deterministic_algorithms_enabled(), "run() restores the global switch"


def test_imagefolder_resnet_with_workers(tmp_path):
    """An ImageFolder tree (as mini-ImageNet / ImageNet presets use) through the standard
    transforms, a ResNet-18 with the CIFAR stem, and two persistent DataLoader workers."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for k in range(3):
            folder = tmp_path / "data" / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    args = [f"runs_dir={tmp_path}", "progress=false", "data.name=imagefolder",
            f"data.dir={tmp_path / 'data'}", "data.image_size=16", "data.batch_size=4",
            "data.workers=2", "model.arch=resnet18", "epochs=1", "track.every=1"]
    # lr 0.5 blows this network up (in the loss, or only in eval mode through BatchNorm's
    # running statistics): either way a TrainingDiverged, not a ClassStats error
    with pytest.raises(TrainingDiverged, match="training diverged"):
        run(load(None, [*args, "optim.lr=0.5"]))
    result = run(load(None, [*args, "optim.lr=0.01"]), overwrite=True)
    assert result.final["train"]["samples"] == 12 and result.final["test"]["samples"] == 6
    import multiprocessing

    assert not multiprocessing.active_children(), "run() stops its persistent workers"
    with pytest.raises(ConfigError, match=r"needs data.dir='.*empty' to hold train/ and val/ "
                                          r"\(or test/\) class folders; found \[\]"):
        (tmp_path / "empty").mkdir()
        run(load(None, [f"runs_dir={tmp_path}", "data.name=imagefolder", "name=other",
                        f"data.dir={tmp_path / 'empty'}"]))


def test_cli_resume_takes_the_saved_config(tmp_path):
    first = cli(*QUICK, f"runs_dir={tmp_path}", "name=r", "epochs=1", "optim.lr=0.3")
    assert first.returncode == 0, first.stderr
    more = cli("--resume", f"runs_dir={tmp_path}", "name=r", "epochs=2")
    assert more.returncode == 0, more.stderr
    records = ckpt.read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["kind"] == "train"] == [1, 2]
    assert load(str(tmp_path / "r" / "config.yaml")).optim.lr == 0.3
