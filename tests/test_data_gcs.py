"""The data side of gs:// paths, against a real GCS API server (fake-gcs-server; tests/helpers/gcs.py): sources,
tokenizer_model and data_dir on a bucket; prepared shards uploaded manifest-last and read through a local
cache; the same token streams as the same prepare done on local paths; unreachable buckets refused first."""

import json
import logging
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
from helpers.gcs import gcs_server

from llmjax.data import corpus
from llmjax.data.pipeline import make_train_iterator
from llmjax.data.prepare import PrepareError, default_data_config, prepare
from llmjax.data.shards import MANIFEST, ShardError, TokenShards, cache_dir
from llmjax.data.sources import read_documents, resolve_sources
from llmjax.data.tokenizer import Tokenizer
from llmjax.models.config import ConfigError

LOG = "llmjax.data.prepare"



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The same small corpus (text files in a folder, a hidden file, JSON Lines, Parquet) locally and on the
    bucket under gs://bkt/corpus; a local cache dir ($LLMJAX_CACHE_DIR) and a working directory."""
    import pyarrow as pa  # only this fixture writes Parquet
    import pyarrow.parquet as pq  # (idem)

    root = tmp_path_factory.mktemp("gcsdata")
    local = root / "corpus"
    topics = [d.text for d in corpus.topic_documents()][:40]
    (local / "text" / "sub").mkdir(parents=True)
    for i, text in enumerate(topics[:20]):
        (local / "text" / ("sub" if i % 3 == 0 else "") / f"t{i:02d}.txt").write_text(text, newline="")
    (local / "text" / ".hidden.txt").write_text("never read\n")
    (local / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in topics[20:30]))
    pq.write_table(pa.table({"text": topics[30:]}), local / "last.parquet")
    with gcs_server() as gcs:
        fs = fsspec.filesystem("gs")
        for p in sorted(local.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{gcs.bucket}/corpus/{p.relative_to(local).as_posix()}")
        saved_env, saved_cwd = os.environ.get("LLMJAX_CACHE_DIR"), os.getcwd()
        os.environ["LLMJAX_CACHE_DIR"] = str(root / "cache")
        (root / "cwd").mkdir()
        os.chdir(root / "cwd")  # a local "gs:" directory would appear here
        try:
            yield {"gcs": gcs, "root": root, "local": local, "fs": fs}
        finally:
            os.chdir(saved_cwd)
            if saved_env is None:
                os.environ.pop("LLMJAX_CACHE_DIR", None)
            else:
                os.environ["LLMJAX_CACHE_DIR"] = saved_env


def config(sources, data_dir, **overrides):
    cfg = default_data_config()
    cfg.sources = tuple(sources)
    cfg.vocab_size = 600
    cfg.max_train_sentences = 1000
    cfg.validation_fraction = 0.1
    cfg.data_dir = str(data_dir)
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def local_sources(local: Path):
    return [str(local / "text"), str(local / "*.jsonl"), str(local / "last.parquet")]


def remote_sources(gcs):
    return [gcs.gs("corpus", "text"), gcs.gs("corpus", "*.jsonl"), gcs.gs("corpus", "last.parquet")]


def batches(data, n=3):
    it = make_train_iterator(data, "causal_lm", family="decoder", global_batch_size=4, seed=3, length=64,
                             process_index=0, process_count=1)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


@pytest.fixture(scope="module")
def prepared(setup):
    gcs, root = setup["gcs"], setup["root"]
    local_m = prepare(config(local_sources(setup["local"]), root / "local-data"), progress=False)
    remote_m = prepare(config(remote_sources(gcs), gcs.gs("prepared")), progress=False)
    return local_m, remote_m


def test_remote_sources_read_like_local_ones(setup):
    gcs, local = setup["gcs"], setup["local"]
    files = resolve_sources(remote_sources(gcs))
    assert [os.fspath(f.path) for f in files] == [
        gcs.gs("corpus", "text", n) for n in ["sub/t00.txt", "sub/t03.txt", "sub/t06.txt", "sub/t09.txt",
                                              "sub/t12.txt", "sub/t15.txt", "sub/t18.txt"]
    ] + [gcs.gs("corpus", "text", f"t{i:02d}.txt") for i in range(20) if i % 3] + [
        gcs.gs("corpus", "more.jsonl"), gcs.gs("corpus", "last.parquet")]  # hidden file skipped, walk order
    local_files = resolve_sources(local_sources(local))
    assert [f.type for f in files] == [f.type for f in local_files]
    assert list(read_documents(files)) == list(read_documents(local_files))
    assert {"size", "generation"} <= set(files[0].describe())
    deep = resolve_sources([gcs.gs("corpus", "**", "*.txt")])  # recursive globs work on the bucket
    assert {os.fspath(f.path) for f in deep} >= {gcs.gs("corpus", "text", "sub", "t00.txt")}
    assert not any(".hidden" in os.fspath(f.path) for f in files)


def test_prepare_to_a_bucket_matches_local(setup, prepared):
    gcs, fs, root = setup["gcs"], setup["fs"], setup["root"]
    local_m, remote_m = prepared
    assert remote_m["dir"].startswith(gcs.gs("prepared") + "/") and remote_m["dir"].endswith(
        remote_m["fingerprint"][:16])
    assert remote_m["tokenizer"]["sha256"] == local_m["tokenizer"]["sha256"]
    assert remote_m["splits"] == local_m["splits"]  # same documents, tokens and file hashes
    key = remote_m["dir"][len("gs://"):]
    fs.invalidate_cache()
    assert sorted(o[len(key) + 1:] for o in fs.find(key)) == [
        "manifest.json", "tokenizer.model", "train/kinds.bin", "train/offsets.bin", "train/tokens.bin",
        "validation/kinds.bin", "validation/offsets.bin", "validation/tokens.bin"]
    # the prepare left nothing local: no staging directory, no "gs:" directory
    assert not cache_dir().exists() or not any(p.name.startswith(".staging") for p in cache_dir().iterdir())
    assert not Path("gs:").exists() and not (root / "cwd" / "gs:").exists()
    # the pipeline reads the bucket's directory through a local copy: the same batches as from the local one
    for a, b in zip(batches(local_m["dir"]), batches(remote_m["dir"])):
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    shards = TokenShards(remote_m["dir"], "validation")
    assert shards.url == remote_m["dir"] and shards.directory.is_relative_to(cache_dir())
    assert len(shards) == local_m["splits"]["validation"]["documents"]
    tok = Tokenizer.load(remote_m["dir"] + "/tokenizer.model")
    assert tok.sha256 == local_m["tokenizer"]["sha256"]
    assert sorted(p.name for p in root.iterdir()) == ["cache", "corpus", "cwd", "local-data"]


def test_second_prepare_is_up_to_date(setup, prepared, caplog, monkeypatch):
    gcs = setup["gcs"]
    monkeypatch.setattr("llmjax.data.prepare.train_tokenizer", lambda *a, **k: pytest.fail("re-tokenized"))
    with caplog.at_level(logging.INFO, LOG):
        again = prepare(config(remote_sources(gcs), gcs.gs("prepared")), progress=False)
    assert again["dir"] == prepared[1]["dir"] and again["created"] == prepared[1]["created"]
    assert "up to date" in caplog.text


def test_half_uploaded_directory_is_not_taken_as_prepared(setup, prepared, caplog):
    gcs, fs = setup["gcs"], setup["fs"]
    cfg = config(remote_sources(gcs), gcs.gs("half"))
    m = prepare(cfg, progress=False)
    fs.rm(f"{m['dir'][len('gs://'):]}/{MANIFEST}")  # as if the upload stopped before its last object
    fs.invalidate_cache()
    with pytest.raises(ShardError, match="manifest.json"):
        TokenShards(m["dir"])
    with caplog.at_level(logging.INFO, LOG):
        again = prepare(cfg, progress=False)
    assert "up to date" not in caplog.text and again["dir"] == m["dir"]
    assert TokenShards(again["dir"]).num_tokens == prepared[0]["splits"]["train"]["tokens"]


def test_tokenizer_model_on_a_bucket(setup, prepared):
    gcs, fs = setup["gcs"], setup["fs"]
    local_m = prepared[0]
    url = gcs.gs("tokenizers", "mine.model")
    fs.put_file(str(Path(local_m["dir"]) / "tokenizer.model"), url[len("gs://"):])
    m = prepare(config(remote_sources(gcs), gcs.gs("with-tok"), tokenizer_model=url), progress=False)
    assert m["tokenizer"]["trained"] is False and m["tokenizer"]["from"] == url
    assert m["tokenizer"]["sha256"] == local_m["tokenizer"]["sha256"]
    assert m["splits"] == local_m["splits"]
    with pytest.raises(PrepareError, match="data.tokenizer_model=.*no such file"):
        prepare(config(remote_sources(gcs), gcs.gs("with-tok"), tokenizer_model=gcs.gs("tokenizers", "nope.model")),
                progress=False)


@pytest.mark.parametrize("field", ["data_dir", "sources", "tokenizer_model"])
def test_unreachable_bucket_fails_first_naming_the_field(setup, field, monkeypatch):
    root = setup["root"]
    cfg = config(local_sources(setup["local"]), root / "never")
    cfg[field] = ("gs://no-such-bucket/x.txt",) if field == "sources" else "gs://no-such-bucket/x"
    monkeypatch.setattr("llmjax.data.prepare._source_files", lambda *a: pytest.fail("work before the check"))
    with pytest.raises(ConfigError, match=f"data.{field}") as e:
        prepare(cfg, progress=False)
    assert "\n" not in str(e.value) and "no-such-bucket" in str(e.value)
    assert not (root / "never").exists()
    with pytest.raises(ConfigError, match=r"--workdir"):  # data_dir '' with a gs:// workdir: named as such
        prepare(config(local_sources(setup["local"]), ""), "gs://no-such-bucket/run", progress=False)
