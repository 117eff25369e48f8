"""Corpus sources, the default corpus and `prepare`: idempotent, atomic, clear about bad inputs."""

import importlib
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from llmjax.data import corpus
from llmjax.data.prepare import PrepareError, default_data_config, prepare, split_of, validate_data_config
from llmjax.data.shards import ShardError, TokenShards, load_manifest
from llmjax.data.sources import SourceError, read_documents, resolve_sources
from llmjax.data.tokenizer import Tokenizer

LOG = "llmjax.data.prepare"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def docs_of(pattern, **kw):
    return list(read_documents(resolve_sources([str(pattern)], kw.pop("source_type", "auto")), **kw))


@pytest.fixture(scope="module")
def topics():
    return [d.text for d in corpus.topic_documents()]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, topics):
    """~470 KB of real prose: pydoc topics as text files (paragraph documents) and one JSON Lines file."""
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(topics[:50]):
        write(root / "text" / f"topic{i:02d}.txt", text)
    write(root / "more.jsonl", "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(topics[50:])))
    return root


def config(corpus_dir, work, **overrides):
    cfg = default_data_config()
    cfg.sources = (str(corpus_dir / "text"), str(corpus_dir / "*.jsonl"))
    cfg.vocab_size = 1000
    cfg.max_train_sentences = 2000
    cfg.validation_fraction = 0.05
    cfg.data_dir = str(work / "data")
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def expected_documents(corpus_dir, topics):
    """The documents prepare reads, in order: paragraphs of the text files, then the JSON Lines records."""
    out = []
    for text in topics[:50]:
        paragraphs = [p.strip("\n") for p in text.split("\n\n")]
        out += [p for p in paragraphs if p.strip()]
    return out + [t for t in topics[50:] if t.strip()]


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    cfg = config(corpus_dir, work)
    return cfg, prepare(cfg, progress=False)


# --------------------------------------------------------------------------------------------------------
# sources


def test_text_documents_by_paragraph_file_and_line(tmp_path):
    f = write(tmp_path / "a.txt", "first para\nline two\n\n\n  \nsecond\r\npara\r\n\r\nthird\n")
    assert docs_of(f) == ["first para\nline two", "second\r\npara", "third"]
    with open(f, newline="") as raw:
        assert docs_of(f, text_split="file") == [raw.read()]
    assert docs_of(f, text_split="line") == ["first para", "line two", "second", "para", "third"]
    write(tmp_path / "blank.txt", " \n\n\t\n")
    assert docs_of(tmp_path / "blank.txt") == [] and docs_of(tmp_path / "blank.txt", text_split="file") == []


def test_jsonl_documents_and_errors(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"text": "one"}\n\n{"text": "two\\nlines", "x": 1}\n{"text": null}\n')
    assert docs_of(f) == ["one", "two\nlines"]
    write(tmp_path / "b.jsonl", '{"body": "x"}\n')
    assert docs_of(tmp_path / "b.jsonl", text_field="body") == ["x"]
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: the record has no text field 'text' \(it has \['content'\]"):
        docs_of(bad)
    write(tmp_path / "notjson.jsonl", '{"text": "ok"}\n{oops\n')
    with pytest.raises(SourceError, match=r"notjson\.jsonl:2: not valid JSON"):
        docs_of(tmp_path / "notjson.jsonl")
    write(tmp_path / "num.jsonl", '{"text": 5}\n')
    with pytest.raises(SourceError, match=r"num\.jsonl:1: field 'text' is a int"):
        docs_of(tmp_path / "num.jsonl")


def test_parquet_documents_and_errors(tmp_path):
    pa = importlib.import_module("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["alpha doc", None, "beta\ndoc", "  "], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    assert docs_of(tmp_path / "a.parquet") == ["alpha doc", "beta\ndoc"]
    with pytest.raises(SourceError, match=r"a\.parquet: no text column 'body' \(it has \['text', 'n'\]\)"):
        docs_of(tmp_path / "a.parquet", text_field="body")
    write(tmp_path / "fake.parquet", "not parquet")
    with pytest.raises(SourceError, match=r"fake\.parquet is not a readable Parquet file"):
        docs_of(tmp_path / "fake.parquet")


def test_resolving_directories_globs_and_types(tmp_path):
    write(tmp_path / "d" / "b.txt", "b")
    write(tmp_path / "d" / "sub" / "a.md", "a")
    write(tmp_path / "d" / "sub" / "c.jsonl", '{"text": "c"}\n')
    write(tmp_path / "d" / "notes.log", "skipped in a directory: unknown type")
    write(tmp_path / "d" / ".hidden.txt", "skipped: hidden")
    files = resolve_sources([str(tmp_path / "d")])
    assert [(f.path.name, f.type) for f in files] == [("b.txt", "text"), ("a.md", "text"), ("c.jsonl", "jsonl")]
    assert [f.path.name for f in resolve_sources([str(tmp_path / "d" / "**" / "*.jsonl")])] == ["c.jsonl"]
    # Each file once, whatever patterns name it twice.
    assert len(resolve_sources([str(tmp_path / "d"), str(tmp_path / "d" / "b.txt")])) == 3
    # An explicit type overrides the extension.
    assert docs_of(tmp_path / "d" / "notes.log", source_type="text") == ["skipped in a directory: unknown type"]
    with pytest.raises(SourceError, match=r"notes\.log from its extension '\.log'; supported extensions are text: "):
        resolve_sources([str(tmp_path / "d" / "notes.log")])
    with pytest.raises(SourceError, match=r"source file .*nope\.txt does not exist"):
        resolve_sources([str(tmp_path / "nope.txt")])
    with pytest.raises(SourceError, match=r"matches no file"):
        resolve_sources([str(tmp_path / "*.parquet")])
    with pytest.raises(SourceError, match=r"data.source_type='csv' is unknown"):
        resolve_sources([str(tmp_path / "d")], "csv")


# --------------------------------------------------------------------------------------------------------
# default corpus


def test_default_corpus_is_deterministic_and_tagged():
    head = [d for _, d in zip(range(300), corpus.documents())]
    again = [d for _, d in zip(range(300), corpus.documents())]
    assert head == again
    assert {d.kind for d in head} == {"doc", "code"}
    assert head[0].origin.startswith("pydoc_data.topics:")
    code = [d for d in head if d.kind == "code"]
    assert any(d.text.startswith(("def ", "class ", "async def ", "@")) for d in code)
    assert corpus.fingerprint() == corpus.fingerprint()
    names = {p.name for p in corpus.stdlib_files()}
    assert "antigravity.py" not in names and "this.py" not in names and "json" not in names


def test_code_documents_have_no_docstrings(tmp_path):
    src = write(tmp_path / "m.py", '"""Module doc."""\n\n\ndef f(x):\n    """Doc of f.\n\n    More.\n    """\n'
                '    # a comment\n    return x\n\n\nclass A:\n    """A doc."""\n\n    def g(self):\n        '
                '"""g doc"""\n        return 1\n')
    docs = list(corpus.module_documents(src, "m.py"))
    assert [(d.kind, d.origin) for d in docs] == [("doc", "m.py:<docstrings>"), ("code", "m.py:f"), ("code", "m.py:A")]
    assert docs[0].text == "Module doc.\n\nm.f\n\nDoc of f.\n\nMore.\n\nm.A\n\nA doc.\n\nm.A.g\n\ng doc\n"
    assert docs[1].text == "def f(x):\n    # a comment\n    return x\n"
    assert docs[2].text == "class A:\n\n    def g(self):\n        return 1\n"


def test_prepare_default_corpus(tmp_path):
    cfg = default_data_config()
    cfg.max_documents, cfg.vocab_size, cfg.max_train_sentences, cfg.validation_fraction = 300, 1000, 2000, 0.05
    m = prepare(cfg, tmp_path / "work", progress=False)
    assert Path(m["dir"]).parent == tmp_path / "work" / "data"  # data_dir '' = <workdir>/data
    assert m["source"]["kind"] == "default_corpus" and m["kinds"] == ["doc", "code"]
    assert sum(s["documents"] for s in m["splits"].values()) == 300
    train = TokenShards(m["dir"], "train")
    assert set(train.kinds) == {0, 1} and {train.kind(0), train.kind(len(train) - 1)} <= {"doc", "code"}


# --------------------------------------------------------------------------------------------------------
# prepare


def test_manifest(prepared, corpus_dir, topics):
    cfg, m = prepared
    assert m["format_version"] == 1 and len(m["fingerprint"]) == 64
    tok = Tokenizer.load(Path(m["dir"]) / m["tokenizer"]["file"])
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["tokenizer"]["vocab_size"] == 1000 == tok.vocab_size
    assert m["tokenizer"]["trained"] and m["tokenizer"]["num_sentinels"] == 100
    assert m["token_dtype"] == "<u2" and m["kinds"] == ["text"]
    n = len(expected_documents(corpus_dir, topics))
    assert m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"] == n
    assert 0 < m["splits"]["validation"]["documents"] < 0.1 * n
    files = m["inputs"]["source"]["files"]
    assert len(files) == 51 and all({"path", "size", "mtime_ns", "type"} <= set(f) for f in files)
    assert m["source"]["files"] == 51
    assert json.loads((Path(m["dir"]) / "manifest.json").read_text())["fingerprint"] == m["fingerprint"]


def test_shards_decode_back_to_the_source_text(prepared, corpus_dir, topics):
    cfg, m = prepared
    tok = Tokenizer.load(Path(m["dir"]) / "tokenizer.model")
    docs = expected_documents(corpus_dir, topics)
    for split in ("train", "validation"):
        shards = TokenShards(m["dir"], split)
        want = [d for d in docs if split_of(d, cfg.validation_fraction, cfg.seed) == split]
        assert len(shards) == len(want) == m["splits"][split]["documents"]
        assert [tok.decode(shards[i]) for i in range(len(shards))] == want
        assert shards[0].dtype == np.int32 and shards.lengths.sum() == shards.num_tokens
        assert (shards[-1] == shards[len(shards) - 1]).all()
        with pytest.raises(IndexError):
            shards[len(shards)]
    # A grain data source that survives pickling into worker processes.
    import grain

    shards = TokenShards(m["dir"], "validation")
    copy = pickle.loads(pickle.dumps(shards))
    assert len(pickle.dumps(shards)) < 2000 and (copy[1] == shards[1]).all()
    assert isinstance(shards, grain.sources.RandomAccessDataSource)
    assert (grain.MapDataset.source(shards)[1] == shards[1]).all()
    with pytest.raises(ShardError, match="no split 'test'"):
        TokenShards(m["dir"], "test")


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_second_run_does_nothing_and_says_so(prepared, caplog):
    cfg, m = prepared
    data_dir = Path(cfg.data_dir)
    before = _snapshot(data_dir)
    manifest_text = (Path(m["dir"]) / "manifest.json").read_text()
    with caplog.at_level(logging.INFO, logger=LOG):
        again = prepare(cfg, progress=False)
    assert again == m
    assert "up to date, nothing to do" in caplog.text and m["dir"] in caplog.text
    assert "training" not in caplog.text
    assert _snapshot(data_dir) == before
    assert (Path(m["dir"]) / "manifest.json").read_text() == manifest_text


def test_changed_input_is_reported_and_prepared_afresh(corpus_dir, tmp_path, caplog, topics):
    src = tmp_path / "src"
    for i, text in enumerate(topics[:30]):
        write(src / f"t{i}.txt", text)
    cfg = config(corpus_dir, tmp_path, sources=(str(src),), validation_fraction=0.1)
    first = prepare(cfg, progress=False)
    write(src / "t3.txt", topics[40])
    with caplog.at_level(logging.INFO, logger=LOG):
        second = prepare(cfg, progress=False)
    assert second["dir"] != first["dir"] and load_manifest(first["dir"]) == first  # old data untouched
    assert "inputs changed" in caplog.text and "t3.txt" in caplog.text and second["dir"] in caplog.text
    caplog.clear()
    cfg.vocab_size = 900
    with caplog.at_level(logging.INFO, logger=LOG):
        prepare(cfg, progress=False)
    assert "vocab_size: 1000 -> 900" in caplog.text
    assert not [p for p in Path(cfg.data_dir).iterdir() if p.name.startswith(".")]


def test_split_is_deterministic_and_order_free(prepared, corpus_dir, tmp_path, topics):
    cfg, m = prepared
    docs = expected_documents(corpus_dir, topics)
    splits = [split_of(d, 0.05, 0) for d in docs]
    assert splits == [split_of(d, 0.05, 0) for d in docs]
    assert splits != [split_of(d, 0.05, 1) for d in docs]  # the seed matters
    assert all(split_of(d, 0.0, 0) == "train" for d in docs)
    # The same files listed in another order, tokenizer reused: the same documents in each split.
    tok_path = Path(m["dir"]) / "tokenizer.model"
    other = config(corpus_dir, tmp_path, sources=(str(corpus_dir / "*.jsonl"), str(corpus_dir / "text")),
                   tokenizer_model=str(tok_path))
    m2 = prepare(other, progress=False)
    assert m2["dir"] != m["dir"] and not m2["tokenizer"]["trained"] and m2["tokenizer"]["from"] == str(tok_path)
    tok = Tokenizer.load(tok_path)
    for split in ("train", "validation"):
        a, b = TokenShards(m["dir"], split), TokenShards(m2["dir"], split)
        assert sorted(tok.decode(x) for x in a) == sorted(tok.decode(x) for x in b)


def _bad_configs(tmp_path):
    foreign = tmp_path / "foreign.model"
    return {
        "missing file": ({"sources": (str(tmp_path / "missing.txt"),)}, r"missing\.txt does not exist"),
        "unknown type": ({"sources": (str(tmp_path / "data.csv"),)}, r"data\.csv from its extension '\.csv'"),
        "empty corpus": ({"sources": (str(tmp_path / "empty.txt"),)}, r"corpus is empty: data.sources=\["),
        "vocab too small": ({"vocab_size": 400}, r"data\.vocab_size=400: too small .* at least 430"),
        "bad fraction": ({"validation_fraction": 1.5}, r"data\.validation_fraction=1\.5: must be in \[0, 1\)"),
        "bad type": ({"tokenizer_type": "wordpiece"}, r"data\.tokenizer_type='wordpiece'"),
        "missing model": ({"tokenizer_model": str(tmp_path / "no.model")}, r"tokenizer_model=.*no\.model.*no such"),
        "foreign model": ({"tokenizer_model": str(foreign)}, r"data\.tokenizer_model: .*foreign\.model"),
        "bad source_type": ({"source_type": "xml"}, r"data\.source_type='xml' is unknown"),
        "bad text_split": ({"text_split": "sentence"}, r"data\.text_split='sentence'"),
        "all validation": ({"validation_fraction": 0.999999}, r"lower data\.validation_fraction"),
    }


@pytest.mark.parametrize("case", list(_bad_configs(Path("."))))
def test_bad_inputs_fail_clearly_and_write_nothing(case, corpus_dir, tmp_path):
    (tmp_path / "foreign.model").write_bytes(b"\x00not a model")
    write(tmp_path / "empty.txt", "\n\n   \n")
    write(tmp_path / "data.csv", "a,b\n")
    overrides, message = _bad_configs(tmp_path)[case]
    cfg = config(corpus_dir, tmp_path / "work", **overrides)
    if case == "all validation":
        cfg.sources, cfg.max_train_sentences = (str(corpus_dir / "text" / "topic00.txt"),), 200
        cfg.vocab_size = 500
    with pytest.raises(ValueError, match=message):
        prepare(cfg, progress=False)
    assert not (tmp_path / "work").exists()


def test_error_midway_leaves_nothing(prepared, corpus_dir, tmp_path, topics):
    _, m = prepared
    lines = [json.dumps({"text": t}) for t in topics] + ['{"title": "no text here"}']
    bad = write(tmp_path / "late.jsonl", "\n".join(lines) + "\n")
    cfg = config(corpus_dir, tmp_path, sources=(str(bad),), tokenizer_model=str(Path(m["dir"]) / "tokenizer.model"))
    with pytest.raises(SourceError, match=rf"late\.jsonl:{len(topics) + 1}: the record has no text field 'text'"):
        prepare(cfg, progress=False)
    assert not Path(cfg.data_dir).exists()
    # Into an existing data_dir: no temporary directory or file is left behind either.
    write(Path(cfg.data_dir) / "keep.txt", "other")
    with pytest.raises(SourceError):
        prepare(cfg, progress=False)
    assert [p.name for p in Path(cfg.data_dir).iterdir()] == ["keep.txt"]


def test_loaded_tokenizer_must_match_config(prepared, corpus_dir, tmp_path):
    _, m = prepared
    model = str(Path(m["dir"]) / "tokenizer.model")
    with pytest.raises(PrepareError, match=r"data\.vocab_size=2000 but .* has 1000 pieces; set data\.vocab_size=1000"):
        prepare(config(corpus_dir, tmp_path, tokenizer_model=model, vocab_size=2000), progress=False)
    with pytest.raises(PrepareError, match=r"has 100 sentinels .* 10 were asked for"):
        prepare(config(corpus_dir, tmp_path, tokenizer_model=model, num_sentinels=10), progress=False)
    assert not (tmp_path / "data").exists()


def test_validate_config_names_fields():
    cfg = default_data_config()
    validate_data_config(cfg)
    cfg.max_documents = -1
    with pytest.raises(PrepareError, match=r"data\.max_documents=-1"):
        validate_data_config(cfg)
    del cfg["max_documents"]
    with pytest.raises(PrepareError, match=r"lacks field\(s\) \['max_documents'\]"):
        validate_data_config(cfg)
    cfg = default_data_config()
    with pytest.raises(PrepareError, match="data.data_dir is '' and no workdir"):
        prepare(cfg)
