"""Every config value that would fail at run time fails in validation instead, naming the key,
the rule and the value; config files that are binary, self-referencing, alias bombs or nested
too deeply are ConfigErrors; a bad config creates nothing."""

import dataclasses

import pytest

from ncfast.train import ConfigError, TrainConfig, load, run
from ncfast.train import config as config_mod

RANGE_1 = r"in \[1, 2\^31 - 1\]"
BAD = [
    # (overrides, message)
    *[(["loss.name=rescaled_mse", f"loss.k={v}"], rf"'loss.k' must be finite and > 0, got {g}")
      for v, g in [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("0", "0.0"),
                   ("-1", "-1.0")]],
    *[(["loss.name=rescaled_mse", f"loss.M={v}"], rf"'loss.M' must be finite, got {g}")
      for v, g in [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")]],
    *[([f"optim.lr={v}"], rf"'optim.lr' must be finite and > 0, got {g}")
      for v, g in [(".nan", "nan"), (".inf", "inf"), ("0", "0.0"), ("-0.1", "-0.1")]],
    *[([f"optim.eps={v}"], rf"'optim.eps' must be finite and > 0, got {g}")
      for v, g in [("0", "0.0"), ("-1e-8", "-1e-08"), (".nan", "nan"), (".inf", "inf")]],
    *[([f"optim.betas={v}"], rf"'optim.betas' must be two numbers in \[0, 1\), got {g}")
      for v, g in [("[1.0, 0.999]", r"\[1.0, 0.999\]"), ("[0.9, 1.5]", r"\[0.9, 1.5\]"),
                   ("[-0.1, 0.9]", r"\[-0.1, 0.9\]"), ("[0.9]", r"\[0.9\]"),
                   ("[0.9, 0.99, 0.999]", r"\[0.9, 0.99, 0.999\]"),
                   ("[.nan, 0.9]", r"\[nan, 0.9\]")]],
    *[([f"optim.momentum={v}"], rf"'optim.momentum' must be in \[0, 1\), got {g}")
      for v, g in [("1", "1.0"), ("-0.5", "-0.5"), (".nan", "nan")]],
    *[([f"optim.weight_decay={v}"], rf"'optim.weight_decay' must be finite and >= 0, got {g}")
      for v, g in [("-1", "-1.0"), (".inf", "inf"), (".nan", "nan")]],
    *[([f"schedule.gamma={v}"], rf"'schedule.gamma' must be finite and > 0, got {g}")
      for v, g in [("0", "0.0"), ("-1", "-1.0"), (".nan", "nan")]],
    *[([f"schedule.min_lr={v}"], rf"'schedule.min_lr' must be finite and >= 0, got {g}")
      for v, g in [("-1", "-1.0"), (".nan", "nan")]],
    (["schedule.name=cosine", "schedule.min_lr=1"],
     r"'schedule.min_lr' must be <= optim.lr \(0.5\) with schedule.name='cosine' \(the lr "
     r"would rise\), got 1.0"),
    (["schedule.name=cosine", "schedule.min_lr=0.05", "optim.lr=0.1", "data.batch_size=64",
      "optim.lr_reference_batch=256"],
     r"'schedule.min_lr' must be <= optim.lr x data.batch_size / optim.lr_reference_batch "
     r"\(0.025\) with schedule.name='cosine' \(the lr would rise\), got 0.05"),
    # A warm-up ramps from the unscaled lr up to the scaled one: with no scaling up it would do
    # nothing, silently.
    *[([f"optim.lr_reference_batch={ref}", "data.batch_size=64", "schedule.warmup_epochs=5"],
       rf"'schedule.warmup_epochs' must be 0 when optim.lr_reference_batch \({ref}\) >= "
       r"data.batch_size \(64\): the warm-up ramps from the unscaled lr up to the scaled one, "
       r"which is not larger \(optim.lr_reference_batch=0 warms up from 0\), got 5")
      for ref in (64, 256)],
    *[([f"data.test_fraction={v}"], rf"'data.test_fraction' must be in \(0, 1\), got {g}")
      for v, g in [("0", "0.0"), ("1", "1.0"), ("1.5", "1.5"), (".nan", "nan")]],
    *[([f"data.num_classes={v}"], rf"'data.num_classes' must be 0 \(taken from the data\) or "
                                  rf"in \[2, 2\^31 - 1\] \(a classifier needs two classes\), "
                                  rf"got {v}")
      for v in ("1", "-1", str(2**31))],
    *[([f"model.hidden={v}"], rf"'model.hidden' must be a list of widths in \[1, 2\^31 - 1\], "
                              rf"got {g}")
      for v, g in [("[0]", r"\[0\]"), ("[-3]", r"\[-3\]"), ("[8, 0]", r"\[8, 0\]"),
                   (f"[{2**31}]", rf"\[{2**31}\]")]],
    *[([f"seed={v}"], rf"'seed' must be in \[0, 2\^32 - 1\], got {v}")
      for v in ("-1", str(2**32), str(10**30))],
    *[([f"{k}={v}"], rf"'{k}' must be {RANGE_1}, got {v}")
      for k, v in [("epochs", "0"), ("epochs", "-5"), ("epochs", str(2**31)), ("track.every", "0"),
                   ("checkpoint_every", "0"), ("data.batch_size", "0"),
                   ("data.gaussian_dim", "0"), ("optim.lbfgs_history", "-1")]],
    *[([f"data.gaussian_separation={v}"], rf"'data.gaussian_separation' must be finite and >= 0, "
                                          rf"got {g}")
      for v, g in [(".nan", "nan"), ("-1", "-1.0"), (".inf", "inf")]],
    *[([f"name={v}"], rf"config key 'name' must be a folder name{rule}, got {g}")
      for v, rule, g in [
          ("x" * 300, r" of at most 200 bytes \(300 given\)", "'x+\\.\\.\\.x+'"),
          ("é" * 101, r" of at most 200 bytes \(202 given\)", "'é+\\.\\.\\.é+'"),
          ("a/b", r", without '/', '\\' or control characters", "'a/b'"),
          ("a\\b", r", without '/', '\\' or control characters", r"'a\\\\b'"),
          ("a\nb", r", without '/', '\\' or control characters", r"'a\\nb'"),
          ("..", r", not empty and not starting with '.'", r"'\.\.'"),
          (".hidden", r", not empty and not starting with '.'", r"'\.hidden'"),
          ("", r", not empty and not starting with '.'", "''")]],
    (["runs_dir="], r"config key 'runs_dir' must be a folder, got ''"),
    (["epochs=1.5"], r"config key 'epochs' must be int, got 1.5"),
    (["epochs=true"], r"config key 'epochs' must be int, got True"),
    (["optim.lr=[1]"], r"config key 'optim.lr' must be float, got \[1\]"),
    (["model.hidden=5"], r"config key 'model.hidden' must be list\[int\], got 5"),
    (["model.hidden=[1.5]"], r"config key 'model.hidden' must be list\[int\], got \[1.5\]"),
    (["model.hidden=&a [1, *a]"], r"config key 'model.hidden' must be list\[int\], got \[1, "
                                  r"\[1, \[1, \[\.\.\.\]\]\]\]"),
    (["track.test=maybe"], r"config key 'track.test' must be bool, got 'maybe'"),
]


def _id(case):
    text = " ".join(case[0])
    return text if len(text) < 40 else text[:37] + "..."


@pytest.mark.parametrize("overrides, message", BAD, ids=[_id(c) for c in BAD])
def test_bad_values_are_config_errors_naming_key_rule_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load(None, overrides)


def test_every_numeric_key_has_a_range_rule():
    ruled = {key for keys, _, _ in config_mod.RULES for key in keys}
    numeric = {info.key for info in config_mod.key_infos()
               if info.type in ("int", "float", "list[int]", "list[float]")}
    assert numeric - ruled == set()


@pytest.mark.parametrize("key, value, message", [
    ("epochs", "5", r"config key 'epochs' must be int, got '5'"),
    ("optim.lr", float("nan"), r"config key 'optim.lr' must be finite and > 0, got nan"),
    ("runs_dir", "a\0b", r"config key 'runs_dir' must not hold a NUL character, got 'a\\x00b'"),
    ("data.dir", None, r"config key 'data.dir' must be str, got None"),
    ("data", None, r"config key 'data' must be a section \(DataConfig\), got None"),
    ("optim", {"name": "sgd"}, r"config key 'optim' must be a section \(OptimConfig\), got "
                               r"\{'name': 'sgd'\}"),
], ids=["str-int", "nan-lr", "nul-runs-dir", "none-dir", "none-section", "dict-section"])
def test_a_hand_built_config_is_validated_by_run_and_creates_nothing(tmp_path, key, value,
                                                                     message):
    cfg = TrainConfig(runs_dir=str(tmp_path / "runs"))
    section, _, leaf = key.rpartition(".")
    setattr(getattr(cfg, section) if section else cfg, leaf, value)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert list(tmp_path.iterdir()) == []


def test_a_config_that_is_not_a_trainconfig_is_a_type_error():
    with pytest.raises(TypeError, match=r"config must be a TrainConfig, got dict"):
        run({"epochs": 1})


@pytest.mark.parametrize("overrides, message", [
    (["data.name=digits", "data.test_fraction=0.001"],
     r"config key 'data.test_fraction' must leave every class a training and a test image, got "
     r"0.001 \(class 0 would keep 0 of its 178 images for the test set\)"),
    (["data.name=digits", "data.test_fraction=0.999"],
     r"'data.test_fraction' must leave every class a training and a test image, got 0.999 "
     r"\(class 0 would keep 178 of its 178"),
    (["data.name=gaussian", "data.num_classes=3", "data.gaussian_train_per_class=10",
      "data.batch_size=29", "model.hidden=[4]"],
     r"config key 'data.batch_size' must not leave a last training batch of one sample per "
     r"process with BatchNorm \(30 training samples\), got 29"),
], ids=["digits-empty-test", "digits-empty-train", "batchnorm-batch-of-one"])
def test_values_that_only_the_data_can_refuse_fail_before_the_folder(tmp_path, overrides,
                                                                     message):
    with pytest.raises(ConfigError, match=message):
        run(load(None, [*overrides, f"runs_dir={tmp_path}", "progress=false"]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)), r"is not UTF-8 text \(byte 128: invalid start byte\)"),
    (b"\xff\xfe\x00e\x00p\x00", r"is not UTF-8 text \(byte 0: invalid start byte\)"),
    (b"a: &a {b: *a}\n", r"config key 'a.b' must be a value, not a mapping"),
    (b"data: &d {dir: *d}\n", r"config key 'data.dir' must be a value, not a mapping"),
    (b"model: {hidden: &h [1, *h]}\n", r"config key 'model.hidden' must be list\[int\], got "
                                       r"\[1, \[1, \[1, \[\.\.\.\]\]\]\]"),
    (b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     b"about: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
     r"unknown config key 'a'"),
    (b"about: &d [[[[[[[[1]]]]]]]]\nname: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
     r"config key 'about' must be str, got \[\[\[\[\.\.\.\]\]\]\]"),
    (b"[" * 3000 + b"]" * 3000, r"(is nested too deeply to be a config|is not valid YAML)"),
    (b"- 1\n- 2\n", r"must hold a mapping, got list"),
    (b"epochs: [1\n", r"is not valid YAML \(line 2, column 1: expected ',' or ']', but got "
                      r"'<stream end>'\)$"),
    (b"a: 1\n  b: 2\n", r"is not valid YAML \(line 2, column 4: mapping values are not allowed "
                       r"here\)$"),
    (b"1: 2\n", r"config keys must be strings, got 1"),
], ids=["binary", "utf16", "self-mapping", "self-section", "self-list", "alias-bomb",
        "alias-bomb-value", "deep", "list", "broken", "indented", "int-key"])
def test_hostile_config_files_are_config_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"config file '.*c.yaml' " + message
                       if "config key" not in message and "unknown" not in message
                       else message):
        load(str(path))


@pytest.mark.parametrize("path, message", [
    ("x" * 300, r"config file 'x+\.\.\.x+' does not exist and is not a preset name"),
    ("a\0b", r"config file 'a\\x00b' does not exist and is not a preset name"),
], ids=["300-characters", "nul"])
def test_unusable_config_paths_are_config_errors(path, message):
    with pytest.raises(ConfigError, match=message):
        load(path)


def test_every_preset_passes_validation():
    for name in config_mod.list_presets():
        assert dataclasses.is_dataclass(load(name))
