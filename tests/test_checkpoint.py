"""Checkpoints: nothing in a received file runs (weights_only), a damaged file is caught by its
digest and the previous checkpoint is offered, hand-made or partial files are refused by name,
and a refused resume leaves the run folder (config.yaml included) byte for byte."""

import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from ncfast.train import ConfigError, run
from ncfast.train import checkpoint as ckpt
from test_run_folder import tiny, tree_bytes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch run: checkpoint.pt (epoch 2) and checkpoint-previous.pt (epoch 1)."""
    runs = tmp_path_factory.mktemp("runs")
    run(tiny(runs))
    return runs / "digits"


@pytest.fixture
def copy(trained, tmp_path):
    """A fresh copy of the trained run, to attack (resumed with epochs=3)."""
    shutil.copytree(trained, tmp_path / "digits")
    return tmp_path / "digits"


def resume(run_dir):
    return run(tiny(run_dir.parent, "epochs=3"), resume=True)


def assert_refused(run_dir, match, error=ckpt.CheckpointError):
    before = tree_bytes(run_dir)
    with pytest.raises(error, match=match):
        resume(run_dir)
    assert tree_bytes(run_dir) == before


# A mid-epoch position as the loop writes it (the tiny run's epoch has 3 steps of 10 samples).
WITHIN = {"step": 1, "loss_sum": 2.5, "correct": 4, "seen": 10, "seconds": 0.1}


def rewrite(path: Path, edit) -> None:
    """Load a checkpoint's record, let ``edit`` change it, and save it back as is."""
    record = torch.load(path, weights_only=True)
    edit(record)
    torch.save(record, path)


def resign(record: dict) -> None:
    """Give an edited record a valid digest (what a careful forger would do)."""
    record["digest"] = ckpt.digest({k: v for k, v in record.items()
                                     if k not in ("format", "digest")})


def test_save_keeps_the_previous_checkpoint_and_load_verifies(trained):
    assert ckpt.load(trained / ckpt.CHECKPOINT)["epoch"] == 2
    assert ckpt.load(trained / ckpt.PREVIOUS)["epoch"] == 1
    record = torch.load(trained / ckpt.CHECKPOINT, weights_only=True)
    assert record["format"] == ckpt.FORMAT and len(record["digest"]) == 64


def test_resumed_run_continues_from_a_verified_checkpoint(copy):
    result = resume(copy)
    assert [r["epoch"] for r in result.records if r["kind"] == "train"] == [1, 2, 3]
    assert ckpt.load(copy / ckpt.PREVIOUS)["epoch"] == 2


def test_pickle_payload_is_refused_and_never_runs(copy, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    rewrite(copy / ckpt.CHECKPOINT, lambda r: r.__setitem__("rng", Payload()))
    assert_refused(copy, r"holds objects other than tensors and plain data; it was refused and "
                  r"nothing in it ran \(.*GLOBAL.*system")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["model tensor", "optimizer state", "pickled structure"])
def test_a_flipped_bit_is_caught_and_the_previous_checkpoint_offered(copy, where):
    path = copy / ckpt.CHECKPOINT
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        entries = [i for i in z.infolist() if "/data/" in i.filename]
        pickled = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    entry = {"model tensor": entries[0], "optimizer state": entries[-1],
             "pickled structure": pickled}[where]
    # the entry's bytes follow its 30-byte local header, its name and its extra field
    header = entry.header_offset
    name_len = int.from_bytes(data[header + 26:header + 28], "little")
    extra_len = int.from_bytes(data[header + 28:header + 30], "little")
    offset = header + 30 + name_len + extra_len + entry.file_size // 2
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    assert_refused(copy, r"checkpoint '.*checkpoint.pt' (is damaged: its contents do not match its "
                  r"digest|is corrupt or unreadable).*the run folder is unchanged\. The previous "
                  r"checkpoint '.*checkpoint-previous.pt' \(epoch 1\) is intact: to resume from "
                  r"it, move it over checkpoint.pt")
    os.replace(copy / ckpt.PREVIOUS, path)  # what the message offers
    result = resume(copy)
    assert [r["epoch"] for r in result.records if r["kind"] == "train"] == [1, 2, 3]


def test_both_checkpoints_damaged_says_so(copy):
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):
        (copy / name).write_bytes((copy / name).read_bytes()[:-100])
    assert_refused(copy, r"is corrupt or unreadable \(not the zip archive.*the previous checkpoint "
                  r"'.*checkpoint-previous.pt' is damaged too")


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("digest"), r"is damaged: its contents do not match its digest \(stored "
                                r"None"),
    (lambda r: r.__setitem__("format", "other/1"), r"is not an ncfast train checkpoint "
                                                   r"\(expected format 'ncfast.train/2', found "
                                                   r"'other/1'\)"),
], ids=["no-digest", "foreign-format"])
def test_unsigned_or_foreign_files_are_refused(copy, edit, match):
    rewrite(copy / ckpt.CHECKPOINT, edit)
    assert_refused(copy, match)


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.pop("optimizer"), r"lacks the entry 'optimizer'"),
    (lambda r: r.pop("rng"), r"lacks the entry 'rng'"),
    (lambda r: r.__setitem__("epoch", "2"), r"entry 'epoch' must be int, got str"),
    (lambda r: r.__setitem__("epoch", 0), r"entry 'epoch' must be >= 1, got 0"),
    (lambda r: r.__setitem__("model", {}), r"does not fit this model \(RuntimeError: .*Missing "
                                           r"key"),
    (lambda r: r["model"].__setitem__("fc.weight", torch.zeros(3, 3)),
     r"does not fit this model \(RuntimeError: .*size mismatch"),
    (lambda r: r["scheduler"].__setitem__("last_epoch", 7),
     r"does not fit this model \(ValueError: its schedule is at epoch 7, the checkpoint at "
     r"epoch 2\)"),
    (lambda r: r["rng"].__setitem__("torch", torch.zeros(3, dtype=torch.uint8)),
     r"the checkpoint's RNG state is malformed \(RuntimeError"),
    (lambda r: r["rng"].__setitem__("python", [3, [1, 2], None]),
     r"the checkpoint's RNG state is malformed \((ValueError|TypeError)"),
    (lambda r: r["config"]["optim"].__setitem__("lr", -1.0),
     r"the config stored in '.*checkpoint.pt' is invalid \(config key 'optim.lr' must be "
     r"finite and > 0, got -1.0\)"),
    (lambda r: r["config"].__setitem__("config", {"x": 1}),
     r"the config stored in .* is invalid \(unknown config key 'config.x'"),
    (lambda r: r["optimizer"]["param_groups"][0].__setitem__("lr", "x"),
     r"does not fit this model \(ValueError: optimizer group 0: lr must be a finite number "
     r">= 0, got 'x'\)"),
    (lambda r: r["optimizer"]["param_groups"][0].__setitem__("lr", float("inf")),
     r"optimizer group 0: lr must be a finite number >= 0, got inf"),
    (lambda r: r["optimizer"]["param_groups"][0].__setitem__("momentum", 0.5),
     r"optimizer group 0: momentum is 0.5, the config gives 0.9"),
    (lambda r: r["optimizer"]["state"][0].__setitem__("momentum_buffer", torch.zeros(2)),
     r"optimizer state 'momentum_buffer' has shape \[2\], its parameter \[8, 4\]"),
    (lambda r: r["scheduler"].__setitem__("gamma", "x"),
     r"schedule gamma is 'x', the config gives 0.1"),
    (lambda r: r["scheduler"].__setitem__("_last_lr", [float("nan")]),
     r"schedule _last_lr must be a list of finite numbers, got \[nan\]"),
    (lambda r: r.__setitem__("within_epoch", {**WITHIN, "loss_sum": "x"}),
     r"entry 'within_epoch' must be None or a dict of step \(int\), loss_sum \(float\), "
     r"correct \(int\), seen \(int\), seconds \(float\) with step >= 1 and counts >= 0, got "
     r".*'loss_sum': 'x'"),
    (lambda r: r.__setitem__("within_epoch", {**WITHIN, "step": True}),
     r"entry 'within_epoch' must be None or a dict of .*'step': True"),
    (lambda r: r.__setitem__("within_epoch", {**WITHIN, "seen": -5}),
     r"entry 'within_epoch' must be None or a dict of .*'seen': -5"),
    (lambda r: r.__setitem__("within_epoch", {**WITHIN, "step": 3}),
     r"checkpoint '.*checkpoint.pt' stands at step 3 of an epoch, but an epoch of this data has "
     r"3 steps; the run folder is unchanged"),
], ids=["no-optimizer", "no-rng", "epoch-str", "epoch-0", "empty-model", "wrong-shape",
        "schedule-elsewhere", "rng-torch", "rng-python", "config-invalid", "config-unknown",
        "lr-str", "lr-inf", "momentum", "momentum-buffer-shape", "gamma-str", "last-lr-nan",
        "within-loss-str", "within-step-bool", "within-seen-negative", "within-step-past-epoch"])
def test_hand_made_or_partial_checkpoints_are_refused_by_name(copy, edit, match):
    rewrite(copy / ckpt.CHECKPOINT, lambda record: (edit(record), resign(record)))
    assert_refused(copy, match)


@pytest.mark.parametrize("tensor, layout", [
    (torch.eye(2).to_sparse(), r"layout torch.sparse_coo on device cpu"),
    (torch.eye(2).to_sparse_csr(), r"layout torch.sparse_csr on device cpu"),
    (torch.empty(2, device="meta"), r"layout torch.strided on device meta"),
], ids=["sparse-coo", "sparse-csr", "meta"])
def test_a_tensor_without_dense_data_is_refused_by_name(copy, tensor, layout):
    """weights_only loads such tensors; the digest has no bytes to hash in them."""
    rewrite(copy / ckpt.CHECKPOINT, lambda r: r["rng"].__setitem__("extra", tensor))
    assert_refused(copy, r"checkpoint '.*checkpoint.pt': checkpoint entry payload\['rng'\]"
                         r"\['extra'\] must be a dense tensor with data, got " + layout)


def test_config_yaml_is_not_rewritten_before_the_load_succeeds(copy):
    (copy / ckpt.CONFIG).write_text((copy / ckpt.CONFIG).read_text() + "# my notes\n")
    rewrite(copy / ckpt.CHECKPOINT, lambda r: (r.pop("scaler"), resign(r)))
    assert_refused(copy, r"lacks the entry 'scaler'")
    assert (copy / ckpt.CONFIG).read_text().endswith("# my notes\n")


def test_resume_with_another_config_is_refused(copy):
    before = tree_bytes(copy)
    with pytest.raises(ConfigError, match=r"cannot resume with a different config "
                                          r"\(optim.lr: 0.5 -> 0.1\)"):
        run(tiny(copy.parent, "epochs=3", "optim.lr=0.1"), resume=True)
    assert tree_bytes(copy) == before


@pytest.mark.parametrize("entry, value", [
    ("numpy", ["MT19937", torch.zeros(3, dtype=torch.int64), 0, 0, 0.0]),
    ("python", [3, [1, 2], None]),
    ("torch", torch.zeros(3, dtype=torch.uint8)),
], ids=["numpy-short", "python-short", "torch-short"])
def test_a_malformed_rng_state_leaves_every_rng_as_it_was(entry, value):
    import random

    import numpy as np

    state = ckpt.rng_state()
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with pytest.raises(ckpt.CheckpointError, match=r"the checkpoint's RNG state is malformed"):
        ckpt.set_rng_state({**state, entry: value})
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]


@pytest.mark.parametrize("saved, visible", [(2, 1), (1, 3)], ids=["fewer-gpus", "more-gpus"])
def test_cuda_rng_states_are_restored_on_the_gpus_that_exist(monkeypatch, saved, visible):
    """Only the device layer is faked: torch's own set_rng_state runs and looks its generator up
    in torch.cuda.default_generators (one per visible GPU), as it does on a GPU machine."""
    class Generator:
        def __init__(self):
            self.state = None

        def set_state(self, state):
            self.state = state.clone()

    state = ckpt.rng_state()  # before the fakes: on a GPU machine it reads the real GPUs
    generators = tuple(Generator() for _ in range(visible))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "default_generators", generators)
    monkeypatch.setattr(torch.cuda.random, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.random, "_lazy_call", lambda call, **kwargs: call())
    states = [torch.full((16,), device + 1, dtype=torch.uint8) for device in range(saved)]
    ckpt.set_rng_state({**state, "cuda": states})
    kept = min(saved, visible)
    assert [g.state for g in generators[kept:]] == [None] * (visible - kept)
    for generator, state in zip(generators[:kept], states):
        assert torch.equal(generator.state, state)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_cuda_run_resumes_through_the_checked_load(tmp_path, precision):
    """CUDA RNG states and the fp16 grad scaler's state pass weights_only, the digest and the
    checks of a restored optimiser, schedule and scaler."""
    cfg = ["device=cuda", f"precision={precision}", "loss.name=rescaled_mse", "loss.k=2"]
    run(tiny(tmp_path, *cfg, "epochs=1"))
    saved = ckpt.load(tmp_path / "digits" / ckpt.CHECKPOINT)
    assert saved["rng"]["cuda"] and bool(saved["scaler"]) == (precision == "fp16")
    result = run(tiny(tmp_path, *cfg, "epochs=2"), resume=True)
    assert [r["epoch"] for r in result.records if r["kind"] == "train"] == [1, 2]
