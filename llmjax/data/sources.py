"""Corpus files to documents (one string each): plain text, JSON Lines and Parquet, found by path, directory
or glob, typed by extension unless a type is forced. Each may be local or on a bucket (gs://BUCKET/...: listed
and read through gcsfs, the filesystem under etils.epath; `**` globs work there too).

Plain text is cut into documents by `text_split`: 'paragraph' (default; blank lines separate documents, the
BERT pretraining-data convention), 'file' (a whole file is one document, right for code or articles), or
'line'. Blank documents are dropped everywhere.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from etils import epath

from llmjax import storage

SOURCE_TYPES = {
    "text": (".txt", ".text", ".md", ".rst"),
    "jsonl": (".jsonl", ".ndjson"),
    "parquet": (".parquet", ".pq"),
}
TEXT_SPLITS = ("paragraph", "file", "line")
PYARROW_PIN = "pyarrow==26.0.1"


class SourceError(ValueError):
    """Corpus files that cannot be read; the message names the file (and line) and the fix."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: Path | epath.Path  # a resolved local path, or a gs:// epath.Path
    type: str  # a key of SOURCE_TYPES

    def describe(self) -> dict:
        """What identifies this file's content for the prepared-data fingerprint (cheap: no reading). On a
        bucket the object's generation stands for the mtime: any rewrite of an object changes it."""
        if storage.is_remote(self.path):
            info = storage.gcs_filesystem().info(storage.object_name(self.path))
            return {"path": os.fspath(self.path), "type": self.type, "size": int(info["size"]),
                    "generation": str(info.get("generation", ""))}
        st = self.path.stat()
        return {"path": str(self.path), "type": self.type, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def size(self) -> int:
        if storage.is_remote(self.path):
            return int(storage.gcs_filesystem().info(storage.object_name(self.path))["size"])
        return self.path.stat().st_size


def _supported() -> str:
    return "; ".join(f"{t}: {' '.join(exts)}" for t, exts in SOURCE_TYPES.items())


def check_source_type(source_type: str) -> None:
    if source_type != "auto" and source_type not in SOURCE_TYPES:
        raise SourceError(f"data.source_type={source_type!r} is unknown: use 'auto' or one of {tuple(SOURCE_TYPES)}")


def type_of(path: Path, source_type: str = "auto") -> str:
    check_source_type(source_type)
    if source_type != "auto":
        return source_type
    suffix = path.suffix.lower()
    for name, exts in SOURCE_TYPES.items():
        if suffix in exts:
            return name
    raise SourceError(
        f"cannot tell the type of {path} from its extension {suffix or '(none)'!r}; supported extensions are "
        f"{_supported()}; rename it or set data.source_type")


def resolve_sources(patterns: Sequence[str], source_type: str = "auto") -> list[SourceFile]:
    """Files of `patterns` (files, directories walked recursively, or globs with ** allowed), each pattern's
    files sorted, duplicates dropped. In directories, hidden files and (for 'auto') files of unknown type
    are skipped; a file named explicitly must have a known type."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    check_source_type(source_type)
    found: dict[Path, SourceFile] = {}
    for pattern in patterns:
        if storage.is_remote(str(pattern)):
            files = _resolve_remote(str(pattern), source_type)
        else:
            files = _resolve_local(os.path.expanduser(str(pattern)), source_type)
        for f in files:
            found.setdefault(f.path, f)
    return list(found.values())


def _resolve_local(pattern: str, source_type: str) -> list[SourceFile]:
    if glob.has_magic(pattern):
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        files = [p for p in matches if p.is_file()]
        for d in (p for p in matches if p.is_dir()):
            files += _walk(d, source_type)
        if not files:
            raise SourceError(f"source pattern {pattern!r} matches no file")
        files = [SourceFile(p.resolve(), type_of(p, source_type)) for p in files]
    elif Path(pattern).is_dir():
        files = [SourceFile(p.resolve(), type_of(p, source_type)) for p in _walk(Path(pattern), source_type)]
        if not files:
            raise SourceError(f"source directory {pattern} holds no corpus file ({_supported()})")
    elif Path(pattern).is_file():
        files = [SourceFile(Path(pattern).resolve(), type_of(Path(pattern), source_type))]
    else:
        raise SourceError(f"source file {pattern} does not exist")
    return files


def _resolve_remote(pattern: str, source_type: str) -> list[SourceFile]:
    """The files of a gs:// pattern: an object, a "directory" (every object under the prefix, recursively) or
    a glob (gcsfs's, `**` included). As for local directories, hidden names and (for 'auto') unknown types
    found under a directory are skipped."""
    fs = storage.gcs_filesystem()
    key = storage.object_name(pattern)
    fs.invalidate_cache(key if not glob.has_magic(key) else None)

    def under(d: str) -> list[str]:
        keep = []
        for o in sorted(fs.find(d)):
            rel = o[len(d):].strip("/").split("/")
            if any(part.startswith(".") for part in rel):
                continue
            if source_type == "auto" and not any(Path(o).suffix.lower() in e for e in SOURCE_TYPES.values()):
                continue
            keep.append(o)
        return keep

    if glob.has_magic(key):
        matches = sorted(fs.glob(key))
        objects = [o for o in matches if fs.isfile(o)]
        for d in (o for o in matches if o not in objects):
            objects += under(d)
        if not objects:
            raise SourceError(f"source pattern {pattern!r} matches no file")
    elif fs.isfile(key):
        objects = [key]
    elif fs.isdir(key):
        objects = under(key)
        if not objects:
            raise SourceError(f"source directory {pattern} holds no corpus file ({_supported()})")
    else:
        raise SourceError(f"source file {pattern} does not exist")
    return [SourceFile(epath.Path(storage.GS + o), type_of(Path(o), source_type)) for o in objects]


def _walk(directory: Path, source_type: str) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if source_type == "auto" and not any(path.suffix.lower() in e for e in SOURCE_TYPES.values()):
                continue
            out.append(path)
    return sorted(out)


def read_documents(files: Sequence[SourceFile], *, text_split: str = "paragraph",
                   text_field: str = "text") -> Iterator[str]:
    """Every non-blank document of `files`, in order. `text_field` is the JSON Lines field / Parquet column."""
    if text_split not in TEXT_SPLITS:
        raise SourceError(f"data.text_split={text_split!r} is not one of {TEXT_SPLITS}")
    for f in files:
        if f.type == "text":
            yield from _read_text(f.path, text_split)
        elif f.type == "jsonl":
            yield from _read_jsonl(f.path, text_field)
        elif f.type == "parquet":
            yield from _read_parquet(f.path, text_field)
        else:
            raise SourceError(f"source type {f.type!r} of {f.path} is unknown; supported: {_supported()}")


def _open_text(path: Path):
    try:
        if storage.is_remote(path):  # a streamed read of the object, decoded as a local file would be
            raw = storage.gcs_filesystem().open(storage.object_name(path), "rb")
            return io.TextIOWrapper(raw, encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")  # newline="": '\r\n' stays as written
    except FileNotFoundError:
        raise SourceError(f"source file {path} does not exist (it was removed after it was listed)") from None


def _read_text(path: Path, text_split: str) -> Iterator[str]:
    with _open_text(path) as f:
        try:
            if text_split == "file":
                text = f.read()
                if text.strip():
                    yield text
            elif text_split == "line":
                for line in f:
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield line
            else:
                paragraph: list[str] = []
                for line in f:
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        yield "".join(paragraph).rstrip("\r\n")
                        paragraph = []
                if paragraph:
                    yield "".join(paragraph).rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise SourceError(f"source file {path} is not UTF-8 text ({e})") from None


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise SourceError(
                        f"{path}:{lineno}: the record has no text field {field!r} (it has {keys}); "
                        f"set data.text_field to the field that holds the text")
                text = record[field]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise SourceError(f"{path}:{lineno}: field {field!r} is a {type(text).__name__}, not a string")
                if text.strip():
                    yield text
        except UnicodeDecodeError as e:
            raise SourceError(f"source file {path} is not UTF-8 text ({e})") from None


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # heavy: only Parquet sources need it
    except ImportError:
        raise SourceError(f"reading {path} needs pyarrow: pip install {PYARROW_PIN}") from None
    try:
        remote = storage.is_remote(path)
        pf = pq.ParquetFile(storage.gcs_filesystem().open(storage.object_name(path), "rb") if remote else path)
    except Exception as e:  # pyarrow raises ArrowInvalid & co for a file that is not Parquet
        raise SourceError(f"{path} is not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise SourceError(f"{path}: no text column {column!r} (it has {names}); set data.text_field to the "
                          f"column that holds the text")
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise SourceError(f"{path}: column {column!r} holds {type(text).__name__} values, not strings")
            if text.strip():
                yield text
