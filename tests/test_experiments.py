"""ncfast.experiments: sweeps (resumable, skipping finished runs, printable), overlays with a band
over seeds, the paper's figures, NC measured post hoc over kept checkpoints, the mini-ImageNet
converter, the offline CIFAR message and the README table of the digits default."""

import json
import pickle
import re
import urllib.error
import urllib.request

import numpy as np
import pytest

from ncfast.experiments import default_run, figures, plotting, posthoc, sweep
from ncfast.experiments.miniimagenet import FILES, convert
from ncfast.experiments.runs import Run, group_runs, is_finished, load_run
from ncfast.train import ConfigError, load, run
from ncfast.train import checkpoint as ckpt
from ncfast.train.config import dump

QUICK = ["data.name=gaussian", "data.gaussian_dim=16", "data.gaussian_train_per_class=40",
         "data.gaussian_test_per_class=10", "data.batch_size=40", "model.hidden=[32]",
         "optim.lr=0.5", "epochs=4", "track.every=2", "progress=false"]


def nc_record(epoch, split, **values):
    base = {"kind": "nc", "epoch": epoch, "split": split, "accuracy": 0.5, "loss": 1.0,
            "nc1": 1.0, "nc2_means": 0.5, "nc2_classifier": 0.5, "nc3_gram": 0.5,
            "nc3_dual": 0.5, "bias_norm": 0.3, "nc4": 0.1}
    return {**base, **values}


def fake_run(tmp_path, name, seed, nc1_last, loss="mse"):
    records = [nc_record(0, "train"), nc_record(0, "test"),
               {"kind": "train", "epoch": 1, "lr": 0.5}, {"kind": "train", "epoch": 2, "lr": 0.05},
               nc_record(2, "train", nc1=nc1_last, nc4=0.0, accuracy=1.0),
               nc_record(2, "test", nc1=nc1_last, accuracy=0.9)]
    return Run(tmp_path / name, {"name": name, "seed": seed, "loss.name": loss, "epochs": 2},
               records)


# ------------------------------------------------------------------------------- sweep

def test_grid_takes_every_combination_and_keeps_list_values_whole():
    combos = sweep.grid(["loss.name=ce,mse", "model.hidden=[32,32],[16]"])
    assert combos == [["loss.name=ce", "model.hidden=[32,32]"],
                      ["loss.name=ce", "model.hidden=[16]"],
                      ["loss.name=mse", "model.hidden=[32,32]"],
                      ["loss.name=mse", "model.hidden=[16]"]]
    assert sweep.run_name(combos[0]) == "loss.name=ce__model.hidden=32-32"
    assert sweep.grid([]) == [[]]


@pytest.mark.parametrize("axis, message", [
    ("loss.name", r"sweep axis 'loss.name' must be key=value\[,value...\]"),
    ("loss.name=ce,", r"sweep axis 'loss.name=ce,' has an empty value"),
], ids=["no-values", "empty-value"])
def test_bad_sweep_axes_are_named(axis, message):
    with pytest.raises(ConfigError, match=message):
        sweep.grid([axis])


@pytest.mark.parametrize("value", ["a\\b", "a\tb", "\u00e9" * 100],
                         ids=["backslash", "tab", "long-in-bytes"])
def test_every_value_gives_a_run_folder_name_train_accepts(tmp_path, value):
    (planned,) = sweep.plan([(None, [f"about={value}"])], tmp_path)
    assert load(None, planned.train_overrides()).name == planned.name
    assert len(planned.name.encode()) <= 120


@pytest.mark.parametrize("jobs, threads, message", [
    (0, 0, r"--jobs must be an integer >= 1, got 0"),
    (2, -1, r"--threads must be an integer >= 0, got -1"),
], ids=["no-jobs", "negative-threads"])
def test_jobs_and_threads_are_checked_where_runs_start(tmp_path, jobs, threads, message):
    """`ncfast figure --jobs 0` waited forever for a run slot that never opened."""
    with pytest.raises(ConfigError, match=message):
        sweep.execute([], jobs, threads)
    with pytest.raises(SystemExit, match=r"^ncfast sweep: " + message):
        sweep.main(["epochs=1", f"--jobs={jobs}", f"--threads={threads}",
                    f"--runs-dir={tmp_path}"])
    assert list(tmp_path.iterdir()) == []


def test_options_may_sit_between_the_positionals(tmp_path, capsys):
    """As in `ncfast train`: `ncfast sweep seed=0 --print loss.name=ce` was refused with
    'unrecognized arguments: loss.name=ce' (and the same in plot, figure and measure)."""
    sweep.main(["seed=0", "--print", "loss.name=ce", f"--runs-dir={tmp_path}"])
    assert "seed=0 loss.name=ce name=seed=0__loss.name=ce" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^ncfast figure: --jobs must be an integer >= 1"):
        figures.main(["loss", "--jobs", "0", "epochs=1", f"--out={tmp_path / 'f'}"])
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ckpt.CONFIG).write_text(f"name: {name}\nepochs: 2\n")
        (tmp_path / name / ckpt.METRICS).write_text(json.dumps(nc_record(0, "train")) + "\n")
    plotting.main([str(tmp_path / "a"), "--out", str(tmp_path / "p.png"), str(tmp_path / "b")])
    assert "2 runs" in capsys.readouterr().out


def test_a_bad_value_stops_the_sweep_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'optim.name' must be one of"):
        sweep.plan([(None, ["optim.name=sgd"]), (None, ["optim.name=adamm"])], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sweep_resumes_the_interrupted_run_skips_finished_ones_and_prints_commands(
        tmp_path, capsys):
    config = tmp_path / "quick.yaml"
    config.write_text("epochs: 2\ntrack: {every: 1}\nprogress: false\n"
                      "data: {name: gaussian, gaussian_dim: 16, gaussian_train_per_class: 40, "
                      "gaussian_test_per_class: 10, batch_size: 40}\nmodel: {hidden: [32]}\n")
    sweep_dir = tmp_path / "runs" / "s"
    # seed=0 was stopped after 1 of its 2 epochs (its checkpoint is there); seed=1 was killed
    # before its first checkpoint (its folder holds only its config)
    run(load(str(config), ["seed=0", "epochs=1", "name=seed=0", f"runs_dir={sweep_dir}"]))
    (sweep_dir / "seed=1").mkdir()
    (sweep_dir / "seed=1" / "config.yaml").write_text(dump(load(str(config), ["seed=1"])))
    args = [f"--config={config}", "seed=0,1", "--name=s", f"--runs-dir={tmp_path / 'runs'}"]
    sweep.main(args + ["--print"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("ncfast train --config ")
    assert printed[0].endswith(f"name=seed=0 runs_dir={sweep_dir} progress=false --resume")
    assert printed[1].endswith(f"name=seed=1 runs_dir={sweep_dir} progress=false --overwrite")

    sweep.main(args)  # one job: the runs train in this process
    assert "2/2 runs finished" in capsys.readouterr().out
    for seed in (0, 1):
        r = load_run(sweep_dir / f"seed={seed}")
        assert is_finished(r.path, 2)
        assert [x["epoch"] for x in r.records if x["kind"] == "train"] == [1, 2]
    sweep.main(args)
    out = capsys.readouterr().out
    assert "skip   seed=0 (finished)" in out and "skip   seed=1 (finished)" in out

    # the overlay of the sweep: one group (the runs differ in their seed only), mean and band
    plotting.main([str(sweep_dir), "--out", str(tmp_path / "p.png")])
    numbers = json.loads((tmp_path / "p.json").read_text())
    assert (tmp_path / "p.png").stat().st_size > 0
    (group,) = numbers["groups"]
    assert group["seeds"] == [0, 1]
    finals = [load_run(sweep_dir / f"seed={s}").nc("train")[-1]["nc1"] for s in (0, 1)]
    last = group["series"]["nc1/train"][-1]
    assert last["epoch"] == 2 and last["runs"] == 2
    assert last["mean"] == pytest.approx(sum(finals) / 2)
    assert (last["min"], last["max"]) == (min(finals), max(finals))


def test_parallel_jobs_are_separate_processes_with_their_own_logs(tmp_path):
    runs = sweep.plan([(None, [*QUICK, "epochs=1"]),
                       (None, [*QUICK, "epochs=1", "data.dir=x", "data.name=cifar10"])],
                      tmp_path, names=["good", "broken"])
    lines = []
    assert sweep.execute(runs, jobs=2, threads=1, log=lines.append) == [runs[1]]
    assert "done   good" in lines and any(line.startswith("FAILED broken (exit 1; see ")
                                          for line in lines)
    assert is_finished(tmp_path / "good", 1) and (tmp_path / "good.log").is_file()
    assert "data.name='cifar10': no usable data set" in (tmp_path / "broken.log").read_text()


def test_a_run_that_cannot_start_closes_its_log_and_the_sweep_goes_on(tmp_path, monkeypatch):
    runs = sweep.plan([(None, [*QUICK, "epochs=1"])], tmp_path, names=["cannot-start"])
    opened = []
    monkeypatch.setattr(sweep, "open", lambda *a, **k: opened.append(open(*a, **k)) or opened[-1],
                        raising=False)

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(sweep.subprocess, "Popen", refuse)
    lines = []
    assert sweep.execute(runs, jobs=2, threads=1, log=lines.append) == runs
    assert lines[-1] == "FAILED cannot-start (could not start: [Errno 12] Cannot allocate memory)"
    assert len(opened) == 1 and opened[0].closed


# ------------------------------------------------------------------------------- plot

def test_groups_are_labelled_by_what_differs_and_banded_over_seeds(tmp_path):
    runs = [fake_run(tmp_path, "a", 0, 0.1), fake_run(tmp_path, "b", 1, 0.3),
            fake_run(tmp_path, "c", 0, 0.2, loss="ce")]
    groups = group_runs(runs)
    assert [(g.label, len(g.runs)) for g in groups] == [("loss.name=mse", 2), ("loss.name=ce", 1)]
    data = plotting.draw(groups, tmp_path / "f.png", "t", plotting.PAPER)
    assert data["lr_drops"] == [1]
    mse = data["groups"][0]["series"]["nc1/train"]
    assert mse[-1] == {"epoch": 2, "mean": pytest.approx(0.2), "min": 0.1, "max": 0.3, "runs": 2}
    assert data["groups"][0]["series"]["error/test"][-1]["mean"] == pytest.approx(0.1)
    assert json.loads((tmp_path / "f.json").read_text())["panels"][3] == \
        "NC4 (paper's definition)"


def test_only_a_step_schedule_has_lr_drops(tmp_path):
    """A warm-up raises the lr every epoch and a cosine lowers it every epoch: neither is a
    drop to mark (the ImageNet preset has both and got a dotted line at every epoch)."""
    lrs = [0.1, 0.2, 0.3, 0.3, 0.03, 0.03]  # a warm-up, then a step
    records = [{"kind": "train", "epoch": e + 1, "lr": lr} for e, lr in enumerate(lrs)]
    step = Run(tmp_path, {"schedule.name": "step"}, records)
    assert step.lr_drops() == [4]
    assert Run(tmp_path, {"schedule.name": "cosine"}, records).lr_drops() == []
    result = run(load(None, [*QUICK, f"runs_dir={tmp_path}", "schedule.name=cosine"]))
    assert json.loads((result.run_dir / ckpt.PLOT_NUMBERS).read_text())["lr_drops"] == []


def test_zero_values_are_drawn_on_the_symlog_axis(tmp_path):
    runs = [fake_run(tmp_path, "a", 0, 0.1)]
    data = plotting.draw(group_runs(runs), tmp_path / "nc.png", "t", plotting.FULL, columns=4)
    nc4 = data["groups"][0]["series"]["nc4/train"]
    assert [p["mean"] for p in nc4] == [0.1, 0.0]  # the 0 is kept, not dropped off a log axis
    assert plotting._symlog_threshold([0.0, 0.1, 3.0]) == pytest.approx(0.01)


def test_plot_of_a_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"ncfast plot: run folder .*nope' does not exist"):
        plotting.main([str(tmp_path / "nope")])


# ------------------------------------------------------------------------------- figures

def test_figure_list_names_every_figure(capsys):
    figures.main(["--list"])
    out = capsys.readouterr().out
    for name in ("loss", "optimiser", "classifier", "feature-dim", "k-sweep", "M-sweep"):
        assert out.count(f"\n{name} ") + out.startswith(name + " ") == 1, name


@pytest.mark.parametrize("name", list(figures.FIGURES))
def test_every_figure_variant_is_a_valid_config_on_small_and_paper_data(name):
    figure = figures.FIGURES[name]
    for data_dir in (None, "/data/x"):
        items, names = figures.runs_of(figure, "digits", [0, 1], data_dir, [])
        assert len(items) == len(set(names)) == 2 * len(figure.variants)
        for config, overrides in items:
            cfg = load(config, overrides)
            if data_dir:
                assert cfg.data.dir == "/data/x" and cfg.data.name in ("cifar10", "imagefolder")
                assert cfg.data.name == figure.paper_data
            else:
                assert cfg.data.name == "digits"


def test_a_figure_trains_its_variants_and_writes_png_and_numbers(tmp_path):
    extra = [o for o in QUICK if o != "data.name=gaussian"] + ["epochs=2"]
    data = figures.make("loss", tmp_path, [0], "gaussian", extra=extra, log=lambda line: None)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert [g["label"] for g in data["groups"]] == ["MSE", "cross-entropy",
                                                    "rescaled MSE (k=5, M=5)"]
    written = json.loads((tmp_path / "loss.json").read_text())
    assert written["groups"][1]["series"]["nc1/train"][-1]["epoch"] == 2
    ce = load_run(tmp_path / "runs" / "cross-entropy__seed=0")
    assert ce.config["loss.name"] == "ce" and ce.config["data.name"] == "gaussian"


# ------------------------------------------------------------------------------- measure

def test_measure_recomputes_nc_over_the_kept_checkpoints(tmp_path):
    result = run(load(None, [*QUICK, f"runs_dir={tmp_path}", "track.keep_checkpoints=true"]))
    kept = posthoc.kept_checkpoints(result.run_dir)
    assert list(kept) == [0, 2, 4]
    assert ckpt.load_kept(kept[0])["epoch"] == 0
    records = posthoc.measure_run(result.run_dir)
    assert [(r["epoch"], r["split"]) for r in records] == \
        [(e, s) for e in (0, 2, 4) for s in ("train", "test")]
    trained = [r for r in result.records if r["kind"] == "nc"]
    for got, want in zip(records, trained):
        for key in ("accuracy", "nc1", "nc2_means", "nc2_classifier", "nc3_gram", "bias_norm",
                    "nc4", "loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), (got["epoch"], key)
    assert ckpt.read_metrics(result.run_dir / ckpt.MEASURED) == records
    with pytest.raises(ConfigError, match=r"has no kept checkpoint for epochs \[3\]; it has "
                                          r"\[0, 2, 4\]"):
        posthoc.measure_run(result.run_dir, epochs=[3])


def test_measure_of_a_checkpoint_of_another_model_says_so(tmp_path):
    mine = run(load(None, [*QUICK, "epochs=1", f"runs_dir={tmp_path}",
                           "track.keep_checkpoints=true"])).run_dir
    other = run(load(None, [*QUICK, "epochs=1", f"runs_dir={tmp_path}", "name=other",
                            "model.hidden=[5]", "track.keep_checkpoints=true"])).run_dir
    (mine / ckpt.kept(1)).write_bytes((other / ckpt.kept(1)).read_bytes())
    with pytest.raises(SystemExit, match=r"^ncfast measure: checkpoint '.*checkpoint-epoch0001.pt' "
                                         r"does not fit the model of '.*config.yaml' \(Error\(s\) "
                                         r"in loading state_dict for MLP: size mismatch"):
        posthoc.main([str(mine)])
    assert not (mine / ckpt.MEASURED).exists()


@pytest.mark.parametrize("command", [posthoc.main, plotting.main], ids=["measure", "plot"])
@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe", r"is not UTF-8 text \(byte 0: invalid start byte\)"),
    (b"epochs: [1\n", r"is not valid YAML \(line 2, column 1: "),
], ids=["binary", "broken"])
def test_a_run_whose_config_yaml_is_not_a_config_is_named(tmp_path, command, content, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ckpt.CONFIG).write_bytes(content)
    with pytest.raises(SystemExit, match=r"^ncfast (measure|plot): config file '.*config.yaml' "
                       + message):
        command([str(tmp_path / "run")])
    assert not is_finished(tmp_path / "run")


def test_measure_takes_its_overrides_and_checks_its_device(tmp_path, capsys):
    """`ncfast measure RUN data.eval_batch_size=7`: the override used to be taken for a second
    run folder; a device torch cannot use was a traceback."""
    runs = tmp_path / "sweep"
    result = run(load(None, [*QUICK, "epochs=1", f"runs_dir={runs}", "name=seed=0",
                             "track.keep_checkpoints=true"]))
    posthoc.main([str(result.run_dir), "--splits", "train", "data.eval_batch_size=7"])
    assert "2 records" in capsys.readouterr().out
    for argv, message in (
            (["data.eval_batch_size=0"], r"config key 'data.eval_batch_size' must be in "
                                         r"\[1, 2\^31 - 1\], got 0"),
            (["optim.lr=3"], r"overrides must be key=value with key one of data.dir, .*, got "
                             r"'optim.lr=3'"),
            (["--device", "foo"], r"--device must be cpu, cuda or cuda:N, got 'foo'")):
        with pytest.raises(SystemExit, match=r"^ncfast measure: " + message):
            posthoc.main([str(result.run_dir), *argv])
    with pytest.raises(SystemExit, match=r"^ncfast measure: name at least one run folder"):
        posthoc.main(["data.workers=0"])


def test_measure_without_kept_checkpoints_says_how_to_get_them(tmp_path):
    result = run(load(None, [*QUICK, "epochs=1", f"runs_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"kept no checkpoints at its tracking epochs; train "
                                          r"it with track.keep_checkpoints=true"):
        posthoc.measure_run(result.run_dir)
    assert not (result.run_dir / ckpt.MEASURED).exists()


# ------------------------------------------------------------------------------- data

def _pickle(path, classes, per_class, rng, shuffle_dict=False):
    images = rng.integers(0, 256, (len(classes) * per_class, 4, 5, 3), dtype=np.uint8)
    class_dict = {w: list(range(i * per_class, (i + 1) * per_class))
                  for i, w in enumerate(classes)}
    if shuffle_dict:
        class_dict = dict(reversed(list(class_dict.items())))
    with open(path, "wb") as f:
        pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    return images


@pytest.mark.parametrize("per_class, train, test", [(9, 5, 3), (600, 500, 100)],
                         ids=["small-split", "official-500-100"])
def test_miniimagenet_pickles_become_the_official_split(tmp_path, per_class, train, test):
    from PIL import Image

    rng = np.random.default_rng(0)
    wnids = [["n01", "n02"], ["n03"], ["n04", "n05"]]
    arrays = [_pickle(tmp_path / name, w, per_class, rng, shuffle_dict=(i == 2))
              for i, (name, w) in enumerate(zip(FILES, wnids))]
    counts = convert(tmp_path, tmp_path / "out", train, test, log=lambda line: None)
    assert counts == {"classes": 5, "train": 5 * train, "test": 5 * test}
    folders = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert folders == ["000_n01", "001_n02", "002_n03", "003_n04", "004_n05"]
    # class n04: the first `train` images of its block train, the last `test` ones test
    block = arrays[2][:per_class]
    got = sorted((tmp_path / "out" / "train" / "003_n04").iterdir())
    assert len(got) == train
    np.testing.assert_array_equal(np.asarray(Image.open(got[0])), block[0])
    np.testing.assert_array_equal(np.asarray(Image.open(got[-1])), block[train - 1])
    got = sorted((tmp_path / "out" / "test" / "003_n04").iterdir())
    assert len(got) == test
    np.testing.assert_array_equal(np.asarray(Image.open(got[0])), block[per_class - test])


def test_miniimagenet_converter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lacks mini-imagenet-cache-train.pkl"):
        convert(tmp_path, tmp_path / "out")
    rng = np.random.default_rng(0)
    for name in FILES:
        _pickle(tmp_path / name, ["n01"], 4, rng)
    with pytest.raises(ValueError, match=r"class n01 has 4 images, fewer than 500"):
        convert(tmp_path, tmp_path / "out", log=lambda line: None)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / FILES[0], "wb") as f:
        pickle.dump({"image_data": Evil(), "class_dict": {}}, f)
    with pytest.raises(ValueError, match=r"is not a mini-ImageNet pickle \(refusing "
                                         r"builtins.print"):
        convert(tmp_path, tmp_path / "out2", 2, 1, log=lambda line: None)


@pytest.mark.parametrize("bad", ["short-class", "not-a-pickle"])
def test_a_bad_later_pickle_leaves_out_unwritten(tmp_path, bad):
    """The train and val pickles are fine, the test pickle is not: nothing is written (a half
    tree would make the rerun refuse --out as not empty)."""
    rng = np.random.default_rng(0)
    _pickle(tmp_path / FILES[0], ["n01"], 4, rng)
    _pickle(tmp_path / FILES[1], ["n02"], 4, rng)
    if bad == "short-class":
        _pickle(tmp_path / FILES[2], ["n03"], 2, rng)
        message = r"mini-imagenet-cache-test.pkl: class n03 has 2 images, fewer than 3"
    else:
        (tmp_path / FILES[2]).write_bytes(b"not a pickle")
        message = r"mini-imagenet-cache-test.pkl' is not a mini-ImageNet pickle"
    with pytest.raises(ValueError, match=message):
        convert(tmp_path, tmp_path / "out", 3, 1, log=lambda line: None)
    assert not (tmp_path / "out").exists()


# The hostile name is assembled, so the docs check does not read it as a path the repo cites.
CLIMBING_NAME = "/".join(["..", "..", "escaped"])


@pytest.mark.parametrize("class_dict, message", [
    ({CLIMBING_NAME: [0, 1]}, rf"class name '{re.escape(CLIMBING_NAME)}' must be a folder name "
                              r"\(printable, without '/' or '\\'\)"),
    ({"n01": [0, 1], "n02": []}, r"class n02 must list its image indices, got an array of shape "
                                 r"\(0,\)"),
    ({"n01": [[0, 1]]}, r"class n01 must list its image indices, got an array of shape \(1, 2\)"),
], ids=["climbs-out", "empty-class", "nested-indices"])
def test_a_received_pickle_writes_nothing_outside_out(tmp_path, class_dict, message):
    rng = np.random.default_rng(0)
    for name in FILES:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"image_data": rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8),
                         "class_dict": class_dict}, f)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=message):
        convert(tmp_path, tmp_path / "a" / "b" / "out", 1, 1, log=lambda line: None)
    assert sorted(tmp_path.rglob("*")) == before


def test_cifar_download_without_network_says_which_files_to_place_where(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = tmp_path / "data"
    cfg = load(None, ["data.name=cifar10", f"data.dir={data}", "data.download=true",
                      f"runs_dir={tmp_path / 'runs'}", "progress=false"])
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert str(err.value) == (
        f"data.name='cifar10': the download failed ([Errno -3] Temporary failure in name "
        f"resolution); on a machine without network access place the files yourself: either "
        f"the extracted folder {data}/cifar-10-batches-py/ (as in the archive) or the archive "
        f"{data}/cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/"
        f"cifar-10-python.tar.gz) with data.download=true, which then only checks and "
        f"extracts it")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------- default

def test_readme_table_is_the_summary_with_ranges_over_seeds(tmp_path):
    runs = [fake_run(tmp_path, "a", 0, 0.1), fake_run(tmp_path, "b", 1, 0.3)]
    lines = default_run.readme_table(runs).splitlines()
    assert lines[0].startswith("| split | epoch | accuracy | loss | NC1 | NC2 (means) | "
                               "NC2 (classifier) | NC3 | NC4 = ‖Wμ_G+b‖ |")
    assert lines[2].startswith("| train | 0 | 0.5 | 1 | 1 |")
    assert lines[3].startswith("| train | 2 | 1 | 1 | 0.1-0.3 |")
    assert len(lines) == 6


def test_default_checks_name_what_fails():
    records = [nc_record(0, "train", nc1=1.0, nc2_means=0.8),
               nc_record(9, "train", nc1=0.02, nc2_means=0.01, nc2_classifier=0.01,
                         nc3_gram=0.01),
               nc_record(9, "test", accuracy=0.98)]
    result = {c.name: c.ok for c in default_run.checks(records)}
    assert result == {"nc1 fall (x)": False, "nc2_means fall (x)": True,
                      "nc2_classifier fall (x)": True, "nc3_gram fall (x)": True,
                      "test accuracy": True}
    assert str(default_run.checks(records)[0]) == "nc1 fall (x) 50 (FAILS, needs 100)"
