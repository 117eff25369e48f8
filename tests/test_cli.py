"""The command line: `llmjax prepare` with dotted overrides, idempotent, and clear errors for bad input."""

import logging
import pathlib
import subprocess
import sys

import pytest

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


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "llmjax.cli"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: llmjax" in out.stderr


def _llmjax(*args):
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *args], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent.parent, timeout=300)


def test_help_lists_every_command_and_each_command_its_flags():
    out = _llmjax("--help")
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert f"  {name} " in out.stdout, name
    for name, flag in [("train", "--workdir"), ("prepare", "--config"), ("finetune", "--init-from"),
                       ("compile", "--topology"), ("export", "--out"), ("generate", "--prompt"), ("fill", "--text"),
                       ("merge-lora", "--adapters"), ("compare", "--grid"), ("launch", "local")]:
        out = _llmjax(name, "--help")
        assert out.returncode == 0, (name, out.stderr[-500:])
        assert flag in out.stdout and "example" in out.stdout.lower(), (name, out.stdout)
        assert "Unknown command line flag" not in out.stdout + out.stderr


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
