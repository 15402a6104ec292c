"""The run folder's rules: one process per run folder, a folder that is not a run is never
replaced or deleted, --overwrite keeps the old run byte for byte until the new one has written
its first checkpoint, a run killed before its first checkpoint gets the one advice that works,
copied or renamed run folders resume, and a cosine schedule is never resumed off its path."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ncfast.train import ConfigError, load, run
from ncfast.train import checkpoint as ckpt
from ncfast.train.loop import TrainingDiverged
from ncfast.train.runfolder import RunFolder

TINY = ["data.name=gaussian", "data.num_classes=3", "data.gaussian_dim=4",
        "data.gaussian_train_per_class=10", "data.gaussian_test_per_class=4",
        "data.batch_size=10", "model.hidden=[8]", "model.batch_norm=false", "epochs=2",
        "track.every=2", "progress=false"]


def tiny(runs_dir, *extra):
    return load(None, [*TINY, f"runs_dir={runs_dir}", *extra])


def tree_bytes(path: Path) -> dict:
    """Every file under ``path`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def epochs_of(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in ckpt.read_metrics(run_dir / ckpt.METRICS) if r["kind"] == "train"]


@pytest.fixture
def old_run(tmp_path):
    run(tiny(tmp_path))
    return tmp_path / "digits"


@pytest.mark.parametrize("content", [{"notes.txt": "mine"}, {"config.yaml": "x: 1",
                                                             "thesis.tex": "chapter 1"},
                                     {"metrics.jsonl": ""}, {"sub/data.bin": "1"}],
                         ids=["other-files", "config-and-other", "no-config", "subfolder"])
@pytest.mark.parametrize("flags", [{}, {"overwrite": True}], ids=["plain", "overwrite"])
def test_a_folder_that_is_not_a_run_is_never_replaced(tmp_path, content, flags):
    folder = tmp_path / "digits"
    for name, text in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    before = tree_bytes(tmp_path)
    with pytest.raises(ConfigError, match=r"'.*digits' exists and is not an ncfast run folder "
                                          r"\(it holds .*\); it is never replaced or deleted: "
                                          r"choose another name= or runs_dir="):
        run(tiny(tmp_path), **flags)
    assert tree_bytes(tmp_path) == before


def test_resume_names_the_files_of_the_users_in_a_run_folder(old_run):
    """A run folder with a file added by hand is still refused (resume writes into it), by name
    and with the way on, not as 'not an ncfast run folder'."""
    (old_run / "notes.txt").write_text("mine")
    (old_run / "plots").mkdir()
    before = tree_bytes(old_run.parent)
    with pytest.raises(ConfigError, match=r"^cannot resume run folder '.*digits': it holds "
                                          r"'notes.txt', 'plots', which a run does not write; "
                                          r"move them out of the folder and run --resume again$"):
        run(tiny(old_run.parent, "epochs=3"), resume=True)
    assert tree_bytes(old_run.parent) == before
    (old_run / "notes.txt").unlink()
    (old_run / "plots").rmdir()
    run(tiny(old_run.parent, "epochs=3"), resume=True)
    assert epochs_of(old_run) == [1, 2, 3]


def test_the_readme_names_every_file_a_run_folder_may_hold():
    """The README's list is the rule users read: a file it leaves out looks foreign to them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = readme.split("*Run folders*", 1)[1].split(") is", 1)[0]
    names = [name.rstrip("/") for name in ckpt.RUN_FILES if not name.startswith(".")]
    assert [n for n in names if f"`{n}`" not in listed and f"`{n}/`" not in listed] == []


def test_a_file_in_the_way_is_never_replaced(tmp_path):
    (tmp_path / "digits").write_text("mine")
    with pytest.raises(ConfigError, match=r"run folder '.*digits' exists and is not a folder"):
        run(tiny(tmp_path), overwrite=True)
    assert (tmp_path / "digits").read_text() == "mine"


@pytest.mark.parametrize("extra, error, match", [
    (["optim.lr=1e6", "loss.normalize=sample"], TrainingDiverged, r"training diverged in "
                                                                  r"epoch 1"),
    (["data.name=digits", "data.num_classes=5"], ConfigError,
     r"data.num_classes=5 disagrees with the data"),
    (["data.name=cifar10", "data.dir=/nonexistent"], ConfigError, r"no usable data set"),
], ids=["diverges", "wrong-class-count", "missing-data"])
def test_overwrite_that_fails_leaves_the_old_run_byte_for_byte(old_run, extra, error, match):
    before = tree_bytes(old_run.parent)
    with pytest.raises(error, match=match):
        run(tiny(old_run.parent, *extra), overwrite=True)
    assert tree_bytes(old_run.parent) == before
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["digits"]  # no lock, no staging


def test_overwrite_swaps_the_new_run_in_after_its_first_checkpoint(old_run):
    (old_run / ckpt.CONFIG).write_text((old_run / ckpt.CONFIG).read_text() + "# old\n")
    run(tiny(old_run.parent, "epochs=3", "optim.lr=0.3"), overwrite=True)
    assert epochs_of(old_run) == [1, 2, 3]
    assert load(str(old_run / ckpt.CONFIG)).optim.lr == 0.3
    assert "# old" not in (old_run / ckpt.CONFIG).read_text()
    assert ckpt.load(old_run / ckpt.CHECKPOINT)["config"]["optim"]["lr"] == 0.3
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["digits"]


def test_one_process_per_run_folder(tmp_path, old_run):
    holder = RunFolder(tmp_path / "digits", resume=True, overwrite=False)
    try:
        before = tree_bytes(tmp_path)
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(ConfigError, match=r"run folder '.*digits' is in use by another "
                                                  r"ncfast train process; wait for it to end, "
                                                  r"or choose another name="):
                run(tiny(tmp_path, "epochs=3"), **flags)
        assert tree_bytes(tmp_path) == before
    finally:
        holder.release()
    run(tiny(tmp_path, "epochs=3"), resume=True)  # released: the next run may claim it
    assert epochs_of(old_run) == [1, 2, 3]


def test_killed_before_its_first_checkpoint_gets_the_advice_that_works(old_run):
    for name in (ckpt.CHECKPOINT, ckpt.PREVIOUS):
        (old_run / name).unlink()  # as a run killed inside epoch 1 leaves its folder
    before = tree_bytes(old_run)
    with pytest.raises(ConfigError, match=r"holds a run that stopped before its first "
                                          r"checkpoint \(nothing to resume\); pass --overwrite "
                                          r"to start it again"):
        run(tiny(old_run.parent))
    with pytest.raises(ckpt.CheckpointError, match=r"cannot resume: no checkpoint at "
                                                   r"'.*checkpoint.pt'; the run stopped before "
                                                   r"its first checkpoint; start it again with "
                                                   r"--overwrite"):
        run(tiny(old_run.parent), resume=True)
    assert tree_bytes(old_run) == before
    run(tiny(old_run.parent), overwrite=True)
    assert epochs_of(old_run) == [1, 2]


@pytest.mark.parametrize("flags", [{}, {"resume": True}], ids=["plain", "resume"])
def test_a_run_with_only_its_previous_checkpoint_is_pointed_to_it(old_run, flags):
    """checkpoint.pt deleted by hand: the advice was --overwrite, which would delete the intact
    checkpoint-previous.pt as well (an explicit --overwrite still replaces the run)."""
    (old_run / ckpt.CHECKPOINT).unlink()
    before = tree_bytes(old_run.parent)
    with pytest.raises(ckpt.CheckpointError, match=r"run folder '.*digits' has no checkpoint.pt "
                                                   r"but has checkpoint-previous.pt: to resume "
                                                   r"from it, move it over checkpoint.pt"):
        run(tiny(old_run.parent, "epochs=3"), **flags)
    assert tree_bytes(old_run.parent) == before
    os.replace(old_run / ckpt.PREVIOUS, old_run / ckpt.CHECKPOINT)
    run(tiny(old_run.parent, "epochs=3"), resume=True)
    assert epochs_of(old_run) == [1, 2, 3]


@pytest.mark.parametrize("move", [shutil.copytree, os.rename], ids=["copied", "renamed"])
def test_a_copied_or_renamed_run_folder_resumes(old_run, tmp_path, move):
    (tmp_path / "elsewhere").mkdir()
    move(old_run, tmp_path / "elsewhere" / "other")
    result = run(tiny(tmp_path / "elsewhere", "name=other", "epochs=3"), resume=True)
    assert result.run_dir == tmp_path / "elsewhere" / "other"
    assert epochs_of(result.run_dir) == [1, 2, 3]
    assert load(str(result.run_dir / ckpt.CONFIG)).name == "other"


# --overwrite's commit without renameat2 (three renames), killed with os._exit after the
# given rename: argv is the run folder and that count.
KILLED_SWAP = """
import os, sys
from pathlib import Path
from ncfast.train import runfolder

def no_renameat2(*args, **kwargs):
    raise OSError("no renameat2")

runfolder.ctypes.CDLL = no_renameat2
final, kill_after = Path(sys.argv[1]), int(sys.argv[2])
real_rename, renames = os.rename, []

def rename(a, b):
    real_rename(a, b)
    renames.append(b)
    if len(renames) == kill_after:
        os._exit(9)

os.rename = rename
folder = runfolder.RunFolder(final, resume=False, overwrite=True)
folder.create()
(folder.path / "checkpoint.pt").write_bytes(b"new run")
(folder.path / "config.yaml").write_text("new: run")
folder.commit()
"""


@pytest.mark.parametrize("kill_after, survivor", [(1, "old"), (2, "new"), (3, "new")],
                         ids=["old-run-parked", "new-run-in", "old-run-in-staging"])
def test_a_swap_killed_midway_is_completed_by_the_next_claim(old_run, kill_after, survivor):
    before = tree_bytes(old_run)
    done = subprocess.run([sys.executable, "-c", KILLED_SWAP, str(old_run), str(kill_after)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    assert (old_run.parent / ".digits.swap").is_file()  # the kill left the swap's marker
    RunFolder(old_run, resume=True, overwrite=False).release()
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["digits"]
    if survivor == "old":
        assert tree_bytes(old_run) == before
    else:
        assert tree_bytes(old_run) == {ckpt.CHECKPOINT: b"new run", ckpt.CONFIG: b"new: run"}


@pytest.mark.parametrize("run_there", [True, False], ids=["beside-a-run", "no-run"])
def test_a_folder_of_the_users_named_like_the_swaps_is_left_untouched(tmp_path, run_there):
    """Only a folder the swap's marker names is the remains of a swap: a backup of the user's
    at .<name>.old is neither deleted (beside a run) nor moved into the run's place."""
    if run_there:
        run(tiny(tmp_path))
    backup = tmp_path / ".digits.old"
    backup.mkdir()
    (backup / ckpt.CONFIG).write_text("mine")
    (tmp_path / ".digits.swap").write_text("my notes")
    run(tiny(tmp_path, "epochs=3"), resume=run_there)
    assert epochs_of(tmp_path / "digits") == [1, 2, 3]
    assert tree_bytes(backup) == {ckpt.CONFIG: b"mine"}
    assert (tmp_path / ".digits.swap").read_text() == "my notes"


@pytest.mark.parametrize("name", [".digits.old", ".digits.swap"])
def test_overwrite_refuses_to_swap_through_a_name_of_the_users(old_run, name):
    (old_run.parent / name).mkdir()
    (old_run.parent / name / "notes.txt").write_text("mine")
    before = tree_bytes(old_run.parent)
    with pytest.raises(ConfigError, match=rf"^'.*{re.escape(name)}' is in the way of "
                                          r"--overwrite \(the swap of the new run for the old "
                                          r"one may need that name\); it is not ncfast's and is "
                                          r"left untouched: move or rename it$"):
        run(tiny(old_run.parent), overwrite=True)
    assert tree_bytes(old_run.parent) == before


def test_overwrite_whose_old_run_was_removed_meanwhile_keeps_the_new_run(old_run):
    """The old run deleted by hand while the new one trains: the swap has nothing to swap with,
    and the new run (its first checkpoint written) must still become the run folder."""
    folder = RunFolder(old_run, resume=False, overwrite=True)
    try:
        folder.create()
        (folder.path / ckpt.CHECKPOINT).write_bytes(b"new run")
        shutil.rmtree(old_run)
        folder.commit()
    finally:
        folder.release()
    assert (old_run / ckpt.CHECKPOINT).read_bytes() == b"new run"
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["digits"]


def test_runs_dir_that_cannot_hold_folders_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match=r"config key 'runs_dir' must be a folder this process "
                                          r"can write to, got '.*file'"):
        run(tiny(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("runs_dir", ["runs", "new/deeper/runs"], ids=["one", "nested"])
def test_a_failed_first_run_leaves_no_runs_dir_behind(tmp_path, runs_dir):
    with pytest.raises(ConfigError, match="disagrees with the data"):
        run(tiny(tmp_path / runs_dir, "data.name=digits", "data.num_classes=5"))
    assert list(tmp_path.iterdir()) == []


def test_cosine_schedule_is_not_resumed_with_another_length(tmp_path):
    cfg = tiny(tmp_path, "schedule.name=cosine")
    run(cfg)
    before = tree_bytes(tmp_path)
    for epochs in (3, 10):
        with pytest.raises(ConfigError, match=rf"cannot resume a cosine schedule with "
                                              rf"epochs={epochs}: it was built for epochs=2, "
                                              rf"and another length would move the learning "
                                              rf"rate off its path"):
            run(tiny(tmp_path, "schedule.name=cosine", f"epochs={epochs}"), resume=True)
    assert tree_bytes(tmp_path) == before
    run(tiny(tmp_path, "schedule.name=step", "epochs=3"), overwrite=True)
    run(tiny(tmp_path, "schedule.name=step", "epochs=4"), resume=True)  # step: may grow
    assert epochs_of(tmp_path / "digits") == [1, 2, 3, 4]


def test_overwrite_of_a_linked_run_replaces_the_link_and_keeps_its_target(old_run, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "kept"
    os.rename(old_run, target)
    os.symlink(target, old_run)
    before = tree_bytes(target)
    run(tiny(tmp_path, "epochs=1"), overwrite=True)
    assert not old_run.is_symlink() and epochs_of(old_run) == [1]
    assert tree_bytes(target) == before


def test_a_data_dir_the_os_refuses_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'data.dir' must be a readable folder, got "
                                          r"'x+\.\.\.x+' \(File name too long\)"):
        run(tiny(tmp_path, "data.name=imagefolder", "data.dir=" + "x" * 5000))
    assert list(tmp_path.iterdir()) == []
