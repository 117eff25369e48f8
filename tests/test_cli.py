"""The command line: `llmjax prepare` with dotted overrides, idempotent, and clear errors for bad input."""

import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest

from helpers.cli_errors import user_error
from llmjax import cli

CONFIG = str(pathlib.Path(__file__).parent.parent / "configs" / "gpt_tiny.py")
SMALL = ["--config.data.max_documents=200", "--config.data.vocab_size=800", "--config.model.vocab_size=800"]


def test_prepare_twice_second_run_does_nothing(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    argv = ["llmjax", "prepare", f"--config={CONFIG}", *SMALL, f"--workdir={tmp_path}"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "train: " in first and "validation: " in first
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    caplog.clear()
    assert cli.main(argv) == 0
    assert "up to date, nothing to do" in caplog.text
    assert files == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


def test_bad_command_line_input_is_named(tmp_path):
    with pytest.raises(SystemExit, match="config.model.no_such_field|no_such_field"):
        cli.main(["llmjax", "prepare", f"--config={CONFIG}", "--config.model.no_such_field=3"])
    with pytest.raises(SystemExit, match=r"data\.vocab_size=800 differs from model\.vocab_size=8192"):
        cli.main(["llmjax", "prepare", f"--config={CONFIG}", "--config.data.vocab_size=800", f"--workdir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # nothing written
    assert cli.main(["llmjax", "frobnicate"]) == 2
    broken = tmp_path.parent / f"{tmp_path.name}_broken_config.py"  # a config file that raises: named, with its line
    broken.write_text("import os\n\ndef get_config():\n    return os.environ['LLMJAX_NO_SUCH_VARIABLE']\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["llmjax", "train", f"--config={broken}", f"--workdir={tmp_path / 'w'}"])
    assert str(e.value) == (f"llmjax train: --config: line 4 of {broken} raised KeyError: "
                            "'LLMJAX_NO_SUCH_VARIABLE'; fix the config file")
    assert not (tmp_path / "w").exists()


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "llmjax.cli"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: llmjax" in out.stderr


def _llmjax(*args):
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *args], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent.parent, timeout=300)


def test_help_lists_every_command_and_each_command_its_flags(capsys):
    out = _llmjax("--help")  # the entry point in a fresh process; each command's --help in-process (2 s a process)
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert f"  {name} " in out.stdout, name
    for name, flag in [("train", "--workdir"), ("prepare", "--config"), ("finetune", "--init-from"),
                       ("compile", "--topology"), ("export", "--out"), ("generate", "--prompt"), ("fill", "--text"),
                       ("merge-lora", "--adapters"), ("compare", "--grid"), ("launch", "local")]:
        capsys.readouterr()
        try:
            code = cli.main(["llmjax", name, "--help"])
        except SystemExit as e:  # absl's --help exits
            code = e.code
        stdout, stderr = capsys.readouterr()
        assert code in (0, None), (name, code, stderr[-500:])
        assert flag in stdout and "example" in stdout.lower(), (name, stdout)
        assert "Unknown command line flag" not in stdout + stderr


def test_a_mistyped_field_or_command_gets_one_line_with_a_suggestion():
    out = _llmjax("train", f"--config={CONFIG}", "--config.train.stepz=3", "--workdir=/nonexistent/x")
    assert out.returncode != 0 and not pathlib.Path("/nonexistent/x").exists()
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config field 'stepz'; did you mean 'steps'?" in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "\\n" not in lines[0]
    out = _llmjax("trian")
    assert out.returncode == 2 and "did you mean 'train'?" in out.stderr


def test_cpu_runs_do_not_report_a_missing_tpu(tmp_path):
    out = _llmjax("prepare", f"--config={CONFIG}", *SMALL, f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Unable to initialize backend" not in out.stdout + out.stderr


# ------------------------------------------------------------------- user errors: one line, no traceback (issue 20)
def test_missing_config_file_is_named_before_absl_loads_it(tmp_path):
    out = _llmjax("train", "--config", "nope.py", "--workdir", str(tmp_path / "x"))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "Failed loading config file" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "llmjax train: --config: file 'nope.py' does not exist; pass e.g. --config configs/gpt_tiny.py")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match="--config: file '.*nope.py' does not exist"):
        cli.main(["llmjax", "prepare", f"--config={tmp_path / 'nope.py'}"])


def test_workdir_that_is_a_file_is_one_line_without_traceback(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    out = _llmjax("train", f"--config={CONFIG}", f"--workdir={afile}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"llmjax train: --workdir: '{afile}' exists and is not a directory; pass a directory path")
    assert afile.read_text() == "keep"


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_workdir_errors_are_refused_before_anything_is_written(command, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    for workdir, expected in [(afile, "exists and is not a directory"),
                              (afile / "run", "cannot be created: .* is a file, not a directory")]:
        assert cli.main(["llmjax", command, f"--config={CONFIG}", f"--workdir={workdir}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"llmjax {command}: --workdir: "), err
        assert re.search(expected, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_workdir_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert cli.main(["llmjax", "train", f"--config={CONFIG}", f"--workdir={locked / 'run'}"]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_data_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["llmjax", "prepare", f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}",
            f"--config.data.sources={tmp_path / 'none'}/*.txt"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmjax prepare: ") and "matches no file" in err, err
    from llmjax.data.sources import SourceError

    with pytest.raises(SourceError, match="matches no file"):
        cli.main([*argv, "--debug"])
    monkeypatch.setenv("LLMJAX_DEBUG", "1")
    with pytest.raises(SourceError, match="matches no file"):
        cli.main(argv)


def test_bad_train_numbers_are_refused_before_data_preparation(tmp_path, capsys):
    for override, expected in [("eval_every=0", "train.eval_every must be >= 1, got 0"),
                               ("log_every=0", "train.log_every must be >= 1, got 0"),
                               ("checkpoint_every=-1", "train.checkpoint_every must be >= 0, got -1"),
                               ("batch_size=0", "train.batch_size must be >= 1, got 0")]:
        message = user_error(["llmjax", "train", f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}",
                              f"--config.train.{override}"], capsys)
        assert expected in message and message.startswith("llmjax train: ")
        assert not (tmp_path / "w").exists()
