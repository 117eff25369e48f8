"""llmjax.checkpoint on a gs:// workdir, against a real GCS API server (fake-gcs-server; tests/helpers/gcs.py):
save / restore, checksum manifests, a damaged object caught and moved aside (nothing lost), interrupted saves
(no commit file) skipped and removed, export to the bucket and back, and nothing written to a local gs: folder."""

import dataclasses
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from llmjax import checkpoint, runs, storage
from llmjax import sharding as shd
from llmjax.config import load_config, model_config
from llmjax.params import flat_values
from llmjax.state import init_state, make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_STATE = {"first_stream": 0, "positions": [3, 5]}



@pytest.fixture(scope="module")
def tiny():
    """(cfg_json, state, shardings) of a tiny decoder's TrainState on one device."""
    cfg = load_config(ROOT / "configs" / "gpt_tiny.py")
    cfg.model.update(vocab_size=64, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, max_length=16)
    cfg_json = json.loads(cfg.to_json_best_effort())
    mesh = shd.make_mesh(shd.mesh_config(), jax.devices()[:1])
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    _, state, state_sh = init_state(model_config(cfg), tx, mesh, shd.rules_dict(cfg.sharding.rules), 0)
    return cfg_json, state, state_sh


def bumped(state, by: float):
    return dataclasses.replace(state, params=jax.tree.map(lambda x: x + by, state.params))


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(jax.random.key_data(x) if checkpoint._is_key(x) else x) for x in jax.tree.leaves(tree)]


def assert_same(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def objects(url: str) -> dict[str, bytes]:
    """{key relative to url: content} of every object under url."""
    storage.refresh(url)
    return {os.fspath(p)[len(url) + 1:]: p.read_bytes() for p in storage.files_under(url)}


def save_two(workdir: str, tiny) -> None:
    cfg_json, state, _ = tiny
    ck = checkpoint.Checkpoints(workdir, keep=0)
    ck.save(1, state, DATA_STATE, cfg_json)
    ck.save(2, bumped(state, 1.0), DATA_STATE, cfg_json)
    ck.close()


def test_save_and_restore_on_a_bucket(gcs_module, tiny):
    cfg_json, state, state_sh = tiny
    workdir = gcs_module.gs("save")
    save_two(workdir, tiny)
    ck = checkpoint.Checkpoints(workdir)
    assert ck.steps() == [2, 1] and str(ck.directory) == f"{workdir}/checkpoints"
    for s in (1, 2):
        step_dir = ck.directory / str(s)
        manifest = json.loads((step_dir / checkpoint.MANIFEST).read_text())
        assert manifest == checkpoint.file_hashes(step_dir) and any(k.startswith("state/") for k in manifest)
    restored, data_state, step, saved_cfg = ck.restore_latest(state, state_sh, cfg_json)
    ck.close()
    assert step == 2 and data_state == DATA_STATE and saved_cfg == cfg_json
    assert_same(restored, bumped(state, 1.0))
    assert not pathlib.Path("gs:").exists() and not (pathlib.Path.cwd() / "gs:").exists()


def test_damaged_object_is_caught_and_moved_aside_whole(gcs_module, tiny, caplog):
    cfg_json, state, state_sh = tiny
    workdir = gcs_module.gs("damage")
    save_two(workdir, tiny)
    bad = f"{workdir}/checkpoints/2"
    before = objects(bad)
    name = max((k for k in before if k.startswith("state/")), key=lambda k: len(before[k]))
    data = before[name]
    damaged = data[:len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2:])  # same size
    epath.Path(f"{bad}/{name}").write_bytes(damaged)
    caplog.set_level("WARNING", logger="llmjax")
    ck = checkpoint.Checkpoints(workdir)
    restored, _, step, _ = ck.restore_latest(state, state_sh, cfg_json)
    ck.close()
    assert step == 1
    assert_same(restored, state)
    assert f"checkpoint {bad} is incomplete or corrupt" in caplog.text and "checksum" in caplog.text
    corrupt = epath.Path(workdir) / checkpoint.CORRUPT
    moved = list(corrupt.iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("2-")
    assert objects(os.fspath(moved[0])) == {**before, name: damaged}  # every object kept, out of the way
    assert objects(bad) == {} and checkpoint.Checkpoints(workdir).steps() == [1]


def test_unfinalized_step_is_skipped_and_removed(gcs_module, tiny, caplog):
    workdir = gcs_module.gs("unfinalized")
    save_two(workdir, tiny)
    ckpts = f"{workdir}/checkpoints"
    complete = objects(f"{ckpts}/2")
    assert storage.COMMIT_FILE in complete
    for rel, data in complete.items():  # step 3, as a killed save leaves it: everything but the commit files
        if pathlib.PurePosixPath(rel).name != storage.COMMIT_FILE:
            epath.Path(f"{ckpts}/3/{rel}").write_bytes(data)
    storage.refresh(ckpts)
    assert epath.Path(f"{ckpts}/3").is_dir()
    cfg_json, state, state_sh = tiny
    ck = checkpoint.Checkpoints(workdir)
    assert ck.steps() == [2, 1]
    assert ck.restore_latest(state, state_sh, cfg_json)[2] == 2  # not taken for a (corrupt) checkpoint
    assert objects(f"{ckpts}/3") and not epath.Path(workdir, checkpoint.CORRUPT).exists()
    caplog.set_level("INFO", logger="llmjax")
    ck.remove_tmp()
    assert f"removed {ckpts}/3, left by an interrupted save" in caplog.text
    assert objects(f"{ckpts}/3") == {} and objects(f"{ckpts}/2") == complete
    assert ck.steps() == [2, 1]
    ck.close()


def test_export_to_a_bucket_and_load_it(gcs_module, tiny, tmp_path):
    cfg_json, state, _ = tiny
    workdir, out = gcs_module.gs("exp"), gcs_module.gs("exported")
    save_two(workdir, tiny)
    epath.Path(f"{workdir}/tokenizer.model").write_bytes(b"tok")
    assert checkpoint.export(workdir, out) == 2
    assert epath.Path(f"{out}/tokenizer.model").read_bytes() == b"tok"
    assert not epath.Path(f"{out}/{checkpoint.INCOMPLETE}").exists()
    model, cfg = checkpoint.load_exported(out)
    assert cfg["exported_step"] == 2
    assert_same(nnx.state(model, nnx.Param).to_pure_dict(), bumped(state, 1.0).params.to_pure_dict())
    assert checkpoint.stored_array_bytes(f"{out}/{checkpoint.EXPORT_PARAMS}") == sum(
        x.nbytes for x in leaves(state.params))
    # What `llmjax finetune --init-from gs://...` loads: the export, or the training workdir's newest checkpoint.
    want = {k: np.asarray(v) for k, v in flat_values(bumped(state, 1.0).params).items()}
    for source, described in ((out, f"export {out}"), (workdir, f"checkpoint {workdir}/checkpoints/2")):
        params, cfg, tok, what = runs.load_pretrained(source)
        assert what == described and cfg["model"] == cfg_json["model"] and str(tok) == f"{source}/tokenizer.model"
        assert params.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(params[k], want[k], err_msg=k)

    # An interrupted export (marker, no config.json) is written again; a foreign directory is refused.
    epath.Path(f"{out}/{checkpoint.EXPORT_CONFIG}").unlink()
    epath.Path(f"{out}/{checkpoint.INCOMPLETE}").write_text("{}")
    checkpoint.save_best(workdir, 1, state, 0.5, cfg_json)
    assert checkpoint.read_best(workdir) == (1, 0.5)
    checkpoint.write_params(out, state.params.to_pure_dict(), cfg_json, exported_step=1)
    assert json.loads(epath.Path(f"{out}/{checkpoint.EXPORT_CONFIG}").read_text())["exported_step"] == 1
    assert not epath.Path(f"{out}/tokenizer.model").exists()  # the previous export's files went
    assert_same(nnx.state(checkpoint.load_exported(out)[0], nnx.Param).to_pure_dict(), state.params.to_pure_dict())
    foreign = gcs_module.gs("foreign")
    epath.Path(f"{foreign}/notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an llmjax export"):
        checkpoint.write_params(foreign, state.params.to_pure_dict(), cfg_json)
    assert objects(foreign) == {"notes.txt": b"mine"}
    assert not pathlib.Path("gs:").exists() and not (pathlib.Path.cwd() / "gs:").exists()


def test_access_errors_are_not_corruption():
    assert not checkpoint._is_corruption(OSError("Forbidden: https://storage.googleapis.com/b/x\nno access"))
    assert not checkpoint._is_corruption(ValueError("UNAUTHENTICATED: reading gs://b/x"))
    assert not checkpoint._is_corruption(ValueError("UNAVAILABLE: connection reset"))
    wrapped = ValueError("restore failed")
    wrapped.__cause__ = ValueError("PERMISSION_DENIED: caller does not have storage.objects.get access")
    assert not checkpoint._is_corruption(wrapped)
    assert checkpoint._is_corruption(ValueError("DATA_LOSS: Error reading chunk")) and checkpoint._is_corruption(
        FileNotFoundError("gs://b/x/state/manifest.ocdbt"))
