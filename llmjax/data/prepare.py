"""`prepare`: train (or load) the tokenizer and tokenize the corpus once into shards with a manifest.

The output directory is named by a fingerprint of every input (config fields, source file sizes and
mtimes, tokenizer file hash, library versions): `<data_dir>/<fingerprint[:16]>/`. A second run with the
same inputs finds it and does nothing; changed inputs are reported and prepared into a fresh directory next
to the old one, so runs that use the old data keep working and a shared cache directory is safe. Output is
written into a temporary directory and renamed into place at the end: on any error nothing is left behind.

Any path may be a bucket URL (gs://BUCKET/...): sources are read through gcsfs, a tokenizer_model is read
from its object, and with data_dir on a bucket the output is built in a local staging directory (in
`shards.cache_dir()`) and uploaded into `<data_dir>/<fingerprint[:16]>/`, manifest.json last: a directory on
the bucket counts as prepared only once its manifest exists, so an interrupted upload is never used (and the
next prepare uploads it again). Every gs:// path is checked for reachability before any work.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import ml_collections
import numpy as np
import sentencepiece
import tqdm

from llmjax import storage
from llmjax.data import corpus, sources
from llmjax.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER_FILE,
    ShardError,
    ShardWriter,
    cache_dir,
    load_manifest,
    token_dtype,
)
from llmjax.data.tokenizer import (
    MODEL_TYPES,
    TRAINER_VERSION,
    Tokenizer,
    TokenizerError,
    min_vocab_size,
    train_tokenizer,
)
from llmjax.data.vocab import RESERVED_PIECES

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
_BATCH = 256  # documents per encode_batch call


class PrepareError(ValueError):
    """Bad data config or inputs; the message names the field or file and how to fix it."""


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Corpus files, directories or globs ('data/**/*.jsonl'); empty = the embedded default corpus
    # (CPython docs topics + stdlib docstrings and code, ~7.7 MB, no download; see llmjax.data.corpus).
    c.sources = ()
    c.source_type = "auto"  # 'auto' (by extension) | 'text' | 'jsonl' | 'parquet'
    c.text_split = "paragraph"  # text files: 'paragraph' (blank-line separated) | 'file' | 'line'
    c.text_field = "text"  # JSON Lines field / Parquet column holding the text
    c.max_documents = 0  # use only the first N documents (0 = all); for quick experiments
    c.tokenizer_model = ""  # an existing llmjax SentencePiece .model, or '' to train one
    c.tokenizer_type = "unigram"  # 'unigram' | 'bpe' (when training)
    c.vocab_size = 8192  # including the 10 reserved ids and the sentinels; must match tokenizer_model
    c.num_sentinels = 100  # T5 '<extra_id_i>' pieces at the top of the vocabulary
    c.max_train_sentences = 20_000  # paragraphs sampled to train SentencePiece (speed vs quality)
    c.character_coverage = 0.9995  # the rarest characters fall back to bytes
    c.validation_fraction = 0.01  # of documents, chosen by a seeded hash of the text
    c.seed = 0  # tokenizer sample and split hash
    # Where prepared data goes; '' = <workdir>/data. Directories inside are named by content, so one
    # shared cache (e.g. ~/.cache/llmjax/data) can serve many runs and configs.
    c.data_dir = ""
    return c


# ------------------------------------------------------------------------------------------------------------
# Config checking


def _sources_list(value) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    if isinstance(value, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in value):
        return [str(s) for s in value]
    raise PrepareError(f"data.sources must be a list of paths or globs, got {value!r}")


def validate_data_config(cfg) -> None:
    """Raises PrepareError naming the first bad field of a data config."""
    missing = [k for k in default_data_config() if k not in cfg]
    if missing:
        raise PrepareError(f"the data config lacks field(s) {missing}; start from default_data_config()")
    _sources_list(cfg.sources)

    def need(ok: bool, field: str, what: str):
        if not ok:
            raise PrepareError(f"data.{field}={cfg[field]!r}: {what}")

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    sources.check_source_type(cfg.source_type)
    need(cfg.text_split in sources.TEXT_SPLITS, "text_split", f"must be one of {sources.TEXT_SPLITS}")
    need(isinstance(cfg.text_field, str) and cfg.text_field != "", "text_field", "must name a field/column")
    need(is_int(cfg.max_documents) and cfg.max_documents >= 0, "max_documents", "must be an int >= 0 (0 = all)")
    need(isinstance(cfg.tokenizer_model, str), "tokenizer_model", "must be a path or ''")
    need(cfg.tokenizer_type in MODEL_TYPES, "tokenizer_type", f"must be one of {MODEL_TYPES}")
    need(is_int(cfg.num_sentinels) and cfg.num_sentinels >= 0, "num_sentinels", "must be an int >= 0")
    need(is_int(cfg.vocab_size) and cfg.vocab_size > 0, "vocab_size", "must be a positive int")
    if not cfg.tokenizer_model:
        smallest = min_vocab_size(cfg.num_sentinels)
        need(cfg.vocab_size >= smallest, "vocab_size",
             f"too small to train a tokenizer: {len(RESERVED_PIECES)} reserved ids + 256 byte pieces + "
             f"{cfg.num_sentinels} sentinels (data.num_sentinels) + 64 learned pieces need at least {smallest}")
    need(is_int(cfg.max_train_sentences) and cfg.max_train_sentences >= 1, "max_train_sentences", "must be an int >= 1")
    need(isinstance(cfg.character_coverage, float) and 0 < cfg.character_coverage <= 1, "character_coverage",
         "must be in (0, 1]")
    need(isinstance(cfg.validation_fraction, (float, int)) and 0 <= cfg.validation_fraction < 1,
         "validation_fraction", "must be in [0, 1)")
    need(is_int(cfg.seed), "seed", "must be an int")
    need(isinstance(cfg.data_dir, str), "data_dir", "must be a path or '' (= <workdir>/data)")


# ------------------------------------------------------------------------------------------------------------
# Inputs


def _source_files(cfg) -> list[sources.SourceFile]:
    return sources.resolve_sources(_sources_list(cfg.sources), cfg.source_type)


def documents(cfg, files: list[sources.SourceFile] | None = None) -> tuple[tuple[str, ...], Iterator[tuple[str, int]]]:
    """(kind names, iterator of (text, kind index)) of the configured corpus, in its fixed order."""
    if _sources_list(cfg.sources):
        files = _source_files(cfg) if files is None else files
        kinds = ("text",)
        docs = ((t, 0) for t in sources.read_documents(files, text_split=cfg.text_split, text_field=cfg.text_field))
    else:
        kinds = corpus.KINDS
        docs = ((d.text, corpus.KINDS.index(d.kind)) for d in corpus.documents())
    if cfg.max_documents:
        docs = itertools.islice(docs, cfg.max_documents)
    return kinds, docs


def _inputs(cfg, files: list[sources.SourceFile] | None, tok: Tokenizer | None) -> dict:
    """Everything the output depends on; its hash names the output directory."""
    if files is None:
        source = {"default_corpus": corpus.fingerprint()}
    else:
        source = {"files": [f.describe() for f in files], "text_split": cfg.text_split, "text_field": cfg.text_field}
    if tok is None:
        tokenizer = {"train": {k: cfg[k] for k in ("tokenizer_type", "vocab_size", "num_sentinels",
                                                  "max_train_sentences", "character_coverage", "seed")},
                     "sentencepiece": sentencepiece.__version__, "trainer_version": TRAINER_VERSION}
    else:
        tokenizer = {"sha256": tok.sha256, "num_sentinels": tok.num_sentinels}
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "max_documents": cfg.max_documents,
        "tokenizer": tokenizer,
        "split": {"validation_fraction": float(cfg.validation_fraction), "seed": cfg.seed},
    }


def _fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _flatten(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(d, list) and all(isinstance(x, dict) and "path" in x for x in d):  # source files
        for x in d:
            yield from _flatten({k: v for k, v in x.items() if k != "path"}, f"{prefix}{x['path']}.")
    else:
        yield prefix[:-1], d


def _describe_change(old: dict, new: dict) -> str:
    a, b = dict(_flatten(old)), dict(_flatten(new))
    changes = [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(a.keys() | b.keys())
               if a.get(k, "(absent)") != b.get(k, "(absent)")]
    return "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")


def split_of(text: str, validation_fraction: float, seed: int) -> str:
    """'validation' for a seeded-hash fraction of documents, else 'train'. Depends on the text alone, so
    duplicate documents land in the same split and reordering the corpus changes nothing."""
    if validation_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return "validation" if int.from_bytes(digest, "little") < validation_fraction * 2.0**64 else "train"


# ------------------------------------------------------------------------------------------------------------
# prepare


def data_dir_of(cfg, workdir: str | os.PathLike | None):
    """A local Path, or an epath.Path for a gs:// data_dir (or a gs:// workdir's data/)."""
    if cfg.data_dir:
        if storage.is_remote(cfg.data_dir):
            return storage.path(cfg.data_dir.rstrip("/"))
        return Path(cfg.data_dir).expanduser()
    if workdir is None:
        raise PrepareError("data.data_dir is '' and no workdir was given: set one of them")
    if storage.is_remote(workdir):
        return storage.path(os.fspath(workdir).rstrip("/")) / "data"
    return Path(workdir) / "data"


def check_paths(cfg, workdir: str | os.PathLike | None = None) -> None:
    """ConfigError (one line, naming the field) for a gs:// path of the data config whose bucket cannot be
    reached; local paths pass. One request per bucket and field."""
    seen = set()
    data_dir = cfg.data_dir or (os.fspath(workdir) if workdir is not None else "")
    for what, p in [*(("data.sources", s) for s in _sources_list(cfg.sources)),
                    ("data.tokenizer_model", cfg.tokenizer_model),
                    ("data.data_dir" if cfg.data_dir else "--workdir (data.data_dir is '')", data_dir)]:
        bucket = storage.object_name(p).partition("/")[0]
        if storage.is_remote(p) and (what, bucket) not in seen:
            seen.add((what, bucket))
            storage.check_reachable(p, what)


def prepare(data_config, workdir: str | os.PathLike | None = None, *, progress: bool = True) -> dict:
    """Tokenizes the configured corpus into `<data_dir>/<fingerprint>/` (see module doc) unless it is there
    already. Returns the manifest, with 'dir' set to that directory."""
    cfg = data_config
    validate_data_config(cfg)
    data_dir = data_dir_of(cfg, workdir)
    check_paths(cfg, workdir)
    remote = storage.is_remote(data_dir)
    files = _source_files(cfg) if _sources_list(cfg.sources) else None
    tok = _load_tokenizer(cfg) if cfg.tokenizer_model else None
    inputs = _inputs(cfg, files, tok)
    fingerprint = _fingerprint(inputs)
    out = data_dir / fingerprint[:16]
    if remote:  # another process (host 0) may have just uploaded it: no stale listing from gcsfs's cache
        storage.refresh(out)
    if (out / MANIFEST).is_file() if remote else out.exists():  # on a bucket: complete once the manifest is there
        manifest = load_manifest(out)
        if manifest.get("fingerprint") != fingerprint:
            raise PrepareError(f"{out} holds data prepared from other inputs (fingerprint "
                               f"{manifest.get('fingerprint')}); delete it and prepare again")
        log.info("prepared data is up to date, nothing to do: %s", out)
        return manifest
    _report_change(data_dir, inputs, out)

    start = time.time()
    kinds, docs = documents(cfg, files)
    first = next(docs, None)
    if first is None:
        what = f"data.sources={_sources_list(cfg.sources)} ({len(files)} files)" if files else "the default corpus"
        raise PrepareError(f"the corpus is empty: {what} holds no non-blank document")
    docs = itertools.chain([first], docs)
    num_docs = None
    trained = tok is None
    if tok is None:
        counted = _Counter(t for t, _ in docs)
        log.info("training a %s tokenizer of %d pieces on up to %d paragraphs", cfg.tokenizer_type,
                 cfg.vocab_size, cfg.max_train_sentences)
        try:
            tok = train_tokenizer(counted, vocab_size=cfg.vocab_size, num_sentinels=cfg.num_sentinels,
                                  model_type=cfg.tokenizer_type, max_sentences=cfg.max_train_sentences,
                                  character_coverage=cfg.character_coverage, seed=cfg.seed)
        except TokenizerError as e:
            raise PrepareError(f"{e} (data.vocab_size / data.tokenizer_type / data.sources)") from None
        num_docs = counted.n
        log.info("trained the tokenizer on %d documents in %.1f s", num_docs, time.time() - start)
        kinds, docs = documents(cfg, files)

    if remote:  # built in a local staging directory, then uploaded
        created = []
        cache_dir().mkdir(parents=True, exist_ok=True)
        tmp = cache_dir() / f".staging-{fingerprint[:16]}-{uuid.uuid4().hex[:8]}"
    else:
        created = _missing_ancestors(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".tmp-{fingerprint[:16]}-{uuid.uuid4().hex[:8]}"
    writers = {}
    try:
        tmp.mkdir()
        tok.save(tmp / TOKENIZER_FILE)
        dtype = token_dtype(tok.vocab_size)
        writers = {s: ShardWriter(tmp / s, dtype, tok.vocab_size - 1) for s in SPLITS}
        # disable=None: a bar on a terminal, silence in CI logs.
        bar = tqdm.tqdm(total=num_docs, unit="doc", desc="tokenizing", disable=None if progress else True)
        for batch in _batches(docs, _BATCH):
            texts = [t for t, _ in batch]
            for (text, kind), ids in zip(batch, tok.encode_batch(texts)):
                writers[split_of(text, cfg.validation_fraction, cfg.seed)].add(ids, kind, len(text))
            bar.update(len(batch))
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}
        _check_splits(cfg, splits)
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "source": _describe_sources(cfg, files),
            "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                          "num_sentinels": tok.num_sentinels, "model_type": tok.model_type,
                          "trained": trained, "from": None if trained else tok.source},
            "token_dtype": dtype.str,
            "kinds": list(kinds),
            "splits": splits,
            "seconds": round(time.time() - start, 1),
            "inputs": inputs,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if remote:
            _upload(tmp, out)
            shutil.rmtree(tmp)
        else:
            try:
                os.rename(tmp, out)
            except OSError:
                if not (out / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp)  # another process prepared the same inputs first: theirs is as good
                log.info("another process prepared %s first; using it", out)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):  # only directories this call made, and only while empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    manifest = load_manifest(out)
    log.info("prepared %s: %s", out, ", ".join(
        f"{s} {v['documents']} documents / {v['tokens']} tokens" for s, v in manifest["splits"].items()))
    return manifest


class _Counter:
    """Passes items through, counting them."""

    def __init__(self, it):
        self._it, self.n = it, 0

    def __iter__(self):
        for x in self._it:
            self.n += 1
            yield x


def _batches(it, n):
    while batch := list(itertools.islice(it, n)):
        yield batch


def _missing_ancestors(path: Path) -> list[Path]:
    missing = []
    path = path.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    return list(reversed(missing))


def _upload(local: Path, remote) -> None:
    """Copies the prepared directory `local` to the gs:// directory `remote`, manifest.json last: its presence
    says every other object is complete. Objects of an earlier, interrupted upload are overwritten (a prepared
    directory always holds the same file names)."""
    fs = storage.gcs_filesystem()
    root = storage.object_name(remote)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.relative_to(local).as_posix() != MANIFEST)
    for p in files:
        fs.put_file(str(p), f"{root}/{p.relative_to(local).as_posix()}")
    fs.put_file(str(local / MANIFEST), f"{root}/{MANIFEST}")
    fs.invalidate_cache(root)


def _load_tokenizer(cfg) -> Tokenizer:
    remote = storage.is_remote(cfg.tokenizer_model)
    path = storage.path(cfg.tokenizer_model) if remote else Path(cfg.tokenizer_model).expanduser()
    if not path.is_file():
        raise PrepareError(f"data.tokenizer_model={cfg.tokenizer_model!r}: no such file")
    try:
        tok = Tokenizer.load(path if remote else path.resolve(), num_sentinels=cfg.num_sentinels)
    except TokenizerError as e:
        raise PrepareError(f"data.tokenizer_model: {e}") from None
    if tok.vocab_size != cfg.vocab_size:
        raise PrepareError(f"data.vocab_size={cfg.vocab_size} but data.tokenizer_model {path} has "
                           f"{tok.vocab_size} pieces; set data.vocab_size={tok.vocab_size}")
    return tok


def _describe_sources(cfg, files) -> dict:
    if files is None:
        return {"kind": "default_corpus", **corpus.fingerprint()}
    return {"kind": "files", "patterns": _sources_list(cfg.sources), "files": len(files),
            "bytes": sum(f.size() for f in files)}


def _check_splits(cfg, splits: dict) -> None:
    n = sum(s["documents"] for s in splits.values())
    if splits["train"]["documents"] == 0:
        raise PrepareError(f"every one of the {n} documents fell into the validation split: lower "
                           f"data.validation_fraction={cfg.validation_fraction}")
    if cfg.validation_fraction > 0 and splits["validation"]["documents"] == 0:
        raise PrepareError(f"no document of the {n} fell into the validation split: raise "
                           f"data.validation_fraction={cfg.validation_fraction} or set it to 0")


def _created(d) -> str:
    try:
        return str(json.loads((d / MANIFEST).read_text()).get("created", ""))
    except (ValueError, OSError):
        return ""


def _report_change(data_dir: Path, inputs: dict, out: Path) -> None:
    """Says how the inputs differ from the most recently prepared data in `data_dir`, if any."""
    previous = []
    if data_dir.is_dir():
        for d in data_dir.iterdir():
            if not d.name.startswith(".") and (d / MANIFEST).is_file():
                previous.append(d)
    if not previous:
        log.info("preparing data into %s", out)
        return
    if storage.is_remote(data_dir):  # the manifest's own creation time (object stats differ from os.stat's)
        last = max(previous, key=_created)
    else:
        last = max(previous, key=lambda d: (d / MANIFEST).stat().st_mtime)
    try:
        old = load_manifest(last).get("inputs", {})
    except ShardError:
        old = {}
    log.info("inputs changed since %s was prepared (%s); preparing afresh into %s (the old data stays)",
             last, _describe_change(old, inputs), out)
