"""The `ncfast` command: the subcommand table, --version, each subcommand's own --help,
`ncfast train --list-keys` and `--print-config`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

import ncfast
from ncfast import cli
from ncfast.train import config


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ncfast *argv`, run in this process."""
    message = ""
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) or stop.code is None else 1
        if isinstance(stop.code, str):  # sys.exit(message): Python prints it to stderr
            message = stop.code
    out = capsys.readouterr()
    return code or 0, out.out, out.err + message


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert (code, out.strip()) == (0, f"ncfast {ncfast.__version__}")


@pytest.mark.parametrize("argv", [(), ("--help",)], ids=["bare", "help"])
def test_top_level_help_lists_every_subcommand(capsys, argv):
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    for name, (_, text) in cli.SUBCOMMANDS.items():
        assert f"  {name:<10}{text}" in out


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_each_subcommand_has_its_own_help_and_runs_nothing(capsys, name):
    code, out, _ = run_cli(capsys, name, "--help")
    assert code == 0
    assert out.startswith(f"usage: ncfast {name}")
    assert "GPU visible" not in out  # `ncfast info --help` used to print the info itself


def test_unknown_subcommand_names_the_choices(capsys):
    code, _, err = run_cli(capsys, "trian")
    assert code == 2
    assert "invalid choice: 'trian'" in err
    assert all(repr(name) in err for name in cli.SUBCOMMANDS)


def test_list_keys_gives_type_default_and_help_for_every_key(capsys):
    code, out, _ = run_cli(capsys, "train", "--list-keys")
    assert code == 0
    lines = out.splitlines()
    infos = config.key_infos()
    assert [line.split()[0] for line in lines] == config.all_keys() == [i.key for i in infos]
    for line, i in zip(lines, infos):
        assert i.help, f"config key {i.key} has no help"
        assert line.split()[1] == i.type
        assert f" {i.default!r} " in line and line.endswith(i.help)
    lr = next(line for line in lines if line.startswith("optim.lr "))
    assert lr.split()[1:3] == ["float", "0.5"]


def test_print_config_is_the_resolved_config_and_trains_nothing(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--print-config", "epochs=7", "optim.lr=0.25",
                           f"runs_dir={tmp_path}")
    assert code == 0
    assert config.from_dict(yaml.safe_load(out)) == config.load(
        None, ["epochs=7", "optim.lr=0.25", f"runs_dir={tmp_path}"])
    assert list(tmp_path.iterdir()) == []


def test_print_config_reports_a_bad_key(capsys):
    code, _, err = run_cli(capsys, "train", "--print-config", "optim.lrr=1")
    assert code == 1
    assert "unknown config key 'optim.lrr'; did you mean 'optim.lr'?" in err


def test_a_reader_that_stops_early_gets_no_traceback():
    """`ncfast train --list-keys | head -3`: the closed pipe ends the command quietly."""
    proc = subprocess.Popen([sys.executable, "-m", "ncfast", "train", "--list-keys"],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
