"""Checkpoint integrity: keep_checkpoints=0 keeps all, checksum manifests catch same-size damage, a workdir whose
every checkpoint is bad is refused (never restarted at step 0 over them), I/O errors move nothing aside, and
the temporary directories of interrupted saves are removed at the next start."""

import json
import pathlib
import re

import pytest

from llmjax import checkpoint, cli
from test_checkpoint import CONFIG, DATA, args, hashes, params_of, train  # the tiny runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, worker_id):
    from conftest import prepared_data_dir

    return pathlib.Path(prepared_data_dir(tmp_path_factory, worker_id, str(CONFIG), DATA))


def fails(capsys, *a) -> str:
    """Run `llmjax train ...`, expect it to fail; the error text (raised, or printed as a user error)."""
    capsys.readouterr()
    try:
        rc = cli.main(["llmjax", *a])
    except (SystemExit, OSError) as e:
        return str(e)
    assert rc != 0
    return capsys.readouterr().err


def biggest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_keep_checkpoints_0_keeps_all(tmp_path, data_dir):
    work = tmp_path / "w"
    train(*args(work, data_dir, 16, "--config.train.keep_checkpoints=0"))
    assert checkpoint.Checkpoints(work).steps() == [16, 12, 8, 4]  # more than the default 3: all kept
    assert params_of(work)[0] == 16


def test_same_size_damage_is_caught_by_the_manifest_and_moved_aside(tmp_path, data_dir, caplog):
    work = tmp_path / "w"
    train(*args(work, data_dir, 12))
    ck = checkpoint.Checkpoints(work)
    assert ck.steps() == [12, 8, 4]
    for s in ck.steps():  # every finalized step got its manifest, and it matches
        step_dir = work / "checkpoints" / str(s)
        manifest = json.loads((step_dir / checkpoint.MANIFEST).read_text())
        assert manifest == checkpoint.file_hashes(step_dir) and any(k.startswith("state/") for k in manifest)
    bad = work / "checkpoints" / "12"
    target = biggest_state_file(bad)
    size = target.stat().st_size
    assert size > 8000
    with open(target, "r+b") as f:  # zero 4,000 bytes in the middle: same size, still a valid-looking file
        f.seek(size // 2 - 2000)
        f.write(b"\0" * 4000)
    assert target.stat().st_size == size
    bad_hashes = hashes(bad)
    caplog.set_level("INFO", logger="llmjax")
    train(*args(work, data_dir, 16))
    assert f"checkpoint {bad} is incomplete or corrupt" in caplog.text and "checksum" in caplog.text
    assert f"resuming from checkpoint {work / 'checkpoints' / '8'} at step 8" in caplog.text
    moved = list((work / checkpoint.CORRUPT).iterdir())
    assert len(moved) == 1 and hashes(moved[0]) == bad_hashes  # kept, out of the way
    assert checkpoint.Checkpoints(work).steps() == [16, 12, 8]
    assert params_of(work)[0] == 16


def test_all_checkpoints_bad_refuses_to_start_and_touches_nothing(tmp_path, data_dir, monkeypatch, capsys):
    work = tmp_path / "w"
    train(*args(work, data_dir, 8))
    steps = checkpoint.Checkpoints(work).steps()
    assert steps == [8, 4]

    # An I/O error that does not show corruption fails the run; nothing is moved or written.
    def denied(step_dir):
        raise PermissionError(13, "Permission denied", str(step_dir / "data"))

    monkeypatch.setattr(checkpoint, "read_data_state", denied)
    before = hashes(work / "checkpoints")
    assert "Permission denied" in fails(capsys, *args(work, data_dir, 12))
    monkeypatch.undo()
    assert hashes(work / "checkpoints") == before and not (work / checkpoint.CORRUPT).exists()

    for s in steps:
        f = biggest_state_file(work / "checkpoints" / str(s))
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    before = hashes(work / "checkpoints")
    text = fails(capsys, *args(work, data_dir, 12))
    assert re.search(r"no checkpoint in .* can be restored .*--workdir", text), text
    for s in steps:
        assert str(work / "checkpoints" / str(s)) in text
    assert hashes(work / "checkpoints") == before  # not restarted at step 0, nothing saved over them
    assert not (work / checkpoint.CORRUPT).exists()
    with pytest.raises(FileNotFoundError, match="can be restored"):  # export/generate: "no checkpoint"
        checkpoint.load_latest(work)
    assert hashes(work / "checkpoints") == before


def test_leftover_tmp_directories_are_removed_at_the_next_start(tmp_path, data_dir, caplog):
    work = tmp_path / "w"
    train(*args(work, data_dir, 4))
    leftover = work / "checkpoints" / "8.orbax-checkpoint-tmp-1234567890"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "half_written").write_bytes(b"x" * 100)
    notes = work / "checkpoints" / "notes.txt"  # anything else is left alone
    notes.write_text("mine")
    caplog.set_level("INFO", logger="llmjax")
    train(*args(work, data_dir, 8))
    assert not leftover.exists() and notes.read_text() == "mine"
    assert f"removed {leftover}" in caplog.text
    assert checkpoint.Checkpoints(work).steps() == [8, 4]


def test_negative_keep_checkpoints_is_refused(tmp_path):
    with pytest.raises(checkpoint.ConfigError, match="keep_checkpoints"):
        checkpoint.Checkpoints(tmp_path, keep=-1)
