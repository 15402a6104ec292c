"""Issue 11's attacks played end to end on the command line: each case prepares a run folder,
runs `ncfast train` with its arguments, and checks the exit status, the one-line message (no
traceback) and that nothing the user had was lost or changed. To keep the suite fast the cases
run one after another in one child interpreter, through the CLI's own entry point
(``ncfast.cli.main(argv)``, its SystemExit read as the exit status and message); the payload
case also runs as its own `python -m ncfast train` process, and two identical runs are started
together as two processes."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ncfast.train import load, run
from ncfast.train import checkpoint as ckpt
from test_run_folder import TINY, epochs_of, tree_bytes


def forge(path: Path, edit, sign: bool = True) -> None:
    record = torch.load(path, weights_only=True)
    edit(record)
    if sign:
        record["digest"] = ckpt.digest({k: v for k, v in record.items()
                                         if k not in ("format", "digest")})
    torch.save(record, path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- the attacks: prepare(runs_dir) -> CLI arguments; check(runs_dir, result) -------------------

def pickle_payload(runs):
    forge(runs / "digits" / ckpt.CHECKPOINT,
          lambda r: r.__setitem__("rng", Payload(runs / "pwned")), sign=False)
    return ["--resume", "epochs=3"]


def flipped_bit(runs):
    path = runs / "digits" / ckpt.CHECKPOINT
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        entry = next(i for i in z.infolist() if "/data/" in i.filename)
    offset = (entry.header_offset + 30 + int.from_bytes(data[entry.header_offset + 26:
                                                              entry.header_offset + 28], "little")
              + int.from_bytes(data[entry.header_offset + 28:entry.header_offset + 30], "little"))
    data[offset + 3] ^= 0x01
    path.write_bytes(bytes(data))
    return ["--resume", "epochs=3"]


def partial_checkpoint(runs):
    forge(runs / "digits" / ckpt.CHECKPOINT, lambda r: r.pop("optimizer"))
    return ["--resume", "epochs=3"]


def foreign_folder(runs):
    shutil.rmtree(runs / "digits")
    (runs / "digits").mkdir()
    (runs / "digits" / "thesis.tex").write_text("chapter 1")
    (runs / "digits" / ckpt.CONFIG).write_text("epochs: 1\n")
    return ["--overwrite"]


def overwrite_then_fail(runs):
    return ["--overwrite", "data.name=digits", "data.num_classes=5"]


def overwrite_then_diverge(runs):
    return ["--overwrite", "optim.lr=1e6", "loss.normalize=sample"]


def killed_before_checkpoint(runs):
    """What SIGKILL inside epoch 1 leaves: config.yaml and the epoch-0 records, no checkpoint."""
    folder = runs / "digits"
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS, ckpt.PLOT):
        (folder / name).unlink()
    kept = [r for r in ckpt.read_metrics(folder / ckpt.METRICS) if r["epoch"] == 0]
    ckpt.atomic_write(folder / ckpt.METRICS,
                      lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
    return []


def killed_then_resume(runs):
    killed_before_checkpoint(runs)
    return ["--resume"]


def renamed(runs):
    os.rename(runs / "digits", runs / "moved")
    return ["--resume", "name=moved", "epochs=3"]


def binary_config(runs):
    (runs.parent / "c.bin").write_bytes(bytes(range(256)) * 4)
    return ["--config", str(runs.parent / "c.bin"), "name=other"]


def self_referencing_config(runs):
    (runs.parent / "c.yaml").write_text("data: &d {dir: *d}\n")
    return ["--config", str(runs.parent / "c.yaml"), "name=other"]


def long_name(runs):
    return ["name=" + "x" * 300]


def cosine_longer(runs):
    return ["--resume", "epochs=5"]


def nan_value(runs):
    return ["name=other", "loss.name=rescaled_mse", "loss.k=nan"]


def unchanged(runs, before):
    assert tree_bytes(runs) == before


def no_new_folder(runs, before):
    assert tree_bytes(runs) == before and not (runs / "other").exists()


ATTACKS = {
    # name: (prepare, base run's extra keys, exit 0?, message, check(runs, before, result))
    "pickle-payload-checkpoint": (
        pickle_payload, [], False,
        r"checkpoint '.*checkpoint.pt' holds objects other than tensors and plain data; it was "
        r"refused and nothing in it ran",
        lambda runs, before: (unchanged(runs, before), not (runs / "pwned").exists()
                              or pytest.fail("the payload ran"))),
    "flipped-bit": (
        flipped_bit, [], False,
        r"is damaged: its contents do not match its digest.*The previous checkpoint "
        r"'.*checkpoint-previous.pt' \(epoch 1\) is intact", unchanged),
    "partial-checkpoint": (
        partial_checkpoint, [], False, r"checkpoint '.*checkpoint.pt' lacks the entry "
                                       r"'optimizer'; the run folder is unchanged", unchanged),
    "overwrite-foreign-folder": (
        foreign_folder, [], False,
        r"'.*digits' exists and is not an ncfast run folder \(it holds 'thesis.tex'\); it is "
        r"never replaced or deleted", unchanged),
    "overwrite-then-bad-data": (
        overwrite_then_fail, [], False, r"data.num_classes=5 disagrees with the data", unchanged),
    "overwrite-then-diverge": (
        overwrite_then_diverge, [], False, r"training diverged in epoch 1", unchanged),
    "rerun-after-kill-before-checkpoint": (
        killed_before_checkpoint, [], False,
        r"holds a run that stopped before its first checkpoint \(nothing to resume\); pass "
        r"--overwrite to start it again", unchanged),
    "resume-after-kill-before-checkpoint": (
        killed_then_resume, [], False,
        r"cannot resume: no checkpoint at '.*checkpoint.pt'; the run stopped before its first "
        r"checkpoint; start it again with --overwrite", unchanged),
    "resume-renamed-folder": (
        renamed, [], True, None,
        lambda runs, before: epochs_of(runs / "moved") == [1, 2, 3]
        or pytest.fail(f"epochs {epochs_of(runs / 'moved')}")),
    "binary-config-file": (
        binary_config, [], False, r"config file '.*c.bin' is not UTF-8 text \(byte 128",
        no_new_folder),
    "self-referencing-config-file": (
        self_referencing_config, [], False, r"config key 'data.dir' must be a value, not a "
                                            r"mapping", no_new_folder),
    "300-character-name": (
        long_name, [], False, r"config key 'name' must be a folder name of at most 200 bytes "
                              r"\(300 given\), got 'x+\.\.\.x+'", unchanged),
    "cosine-resumed-longer": (
        cosine_longer, ["schedule.name=cosine"], False,
        r"cannot resume a cosine schedule with epochs=5: it was built for epochs=2", unchanged),
    "nan-config-value": (
        nan_value, [], False, r"config key 'loss.k' must be finite and > 0, got nan",
        no_new_folder),
}


def cli(runs: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ncfast", "train", *TINY, f"runs_dir={runs}",
                           *args], capture_output=True, text=True, timeout=300)


# Runs each argv through ncfast.cli.main as `python -m ncfast` would: a SystemExit with a
# message prints it to stderr and exits 1; anything else escaping is a traceback.
DRIVER = """
import contextlib, io, json, sys, traceback
from ncfast.cli import main
results = {}
for name, argv in json.loads(sys.stdin.read()).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """Every attack on its own copy of a finished 2-epoch run, in one child interpreter; the
    payload case once more as its own process; two identical runs started together."""
    root = tmp_path_factory.mktemp("attacks")
    bases = {}
    for extra in {tuple(a[1]) for a in ATTACKS.values()}:
        bases[extra] = root / f"base{len(bases)}"
        run(load(None, [*TINY, f"runs_dir={bases[extra]}", *extra]))
    jobs = {}
    for name, (prepare, extra, *_) in ATTACKS.items():
        runs = root / name / "runs"
        shutil.copytree(bases[tuple(extra)], runs)
        jobs[name] = (runs, prepare(runs) + list(extra), tree_bytes(runs))
    own = root / "own-process" / "runs"
    shutil.copytree(bases[()], own)
    own_args = pickle_payload(own)
    own_before = tree_bytes(own)
    argvs = {name: ["train", *TINY, f"runs_dir={runs}", *args]
             for name, (runs, args, _) in jobs.items()}
    together = root / "together"
    with ThreadPoolExecutor(4) as pool:
        pair = [pool.submit(cli, together, ["name=same"]) for _ in range(2)]
        single = pool.submit(cli, own, own_args)
        driven = pool.submit(subprocess.run, [sys.executable, "-c", DRIVER],
                             input=json.dumps(argvs), capture_output=True, text=True,
                             timeout=600)
        driven = driven.result()
        assert driven.returncode == 0, driven.stderr
        results = {name: subprocess.CompletedProcess(argvs[name], code, "", err)
                   for name, (code, err) in json.loads(driven.stdout.splitlines()[-1]).items()}
        results["together"] = [future.result() for future in pair]
        results["own-process"] = single.result()
    jobs["own-process"] = (own, own_args, own_before)
    return jobs, results, together


def check_refused(result, message):
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ncfast train: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_on_the_cli(played, name):
    jobs, results, _ = played
    _, _, succeeds, message, check = ATTACKS[name]
    runs, _, before = jobs[name]
    result = results[name]
    if succeeds:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    else:
        check_refused(result, message)
    check(runs, before)


def test_payload_checkpoint_in_its_own_process(played):
    jobs, results, _ = played
    runs, _, before = jobs["own-process"]
    check_refused(results["own-process"], ATTACKS["pickle-payload-checkpoint"][3])
    assert tree_bytes(runs) == before and not (runs / "pwned").exists()


def test_two_runs_of_one_name_started_together(played):
    """One wins; the other is refused with a clear error and writes nothing into its folder."""
    _, results, together = played
    first, second = results["together"]
    assert sorted([first.returncode, second.returncode]) == [0, 1], (first.stderr, second.stderr)
    loser = first if first.returncode else second
    check_refused(loser, r"run folder '.*same' (is in use by another ncfast train process|"
                         r"already exists; pass --resume)")
    assert epochs_of(together / "same") == [1, 2]  # every epoch once
    assert sorted(p.name for p in together.iterdir()) == ["same"]
