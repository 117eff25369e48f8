"""Fine-tuning task data: JSON Lines readers (checked row by row), label vocabularies, fixed-length encoding,
batching, and two tasks built from the default corpus: documentation-vs-code classification and docstring ->
name (text to text).

Tasks and their JSONL fields (one JSON object per line):
    classification  {"text": str, "label": str|int}           encoder family: [CLS] text [SEP] -> label
    tagging         {"tokens": [str], "tags": [str]}          encoder family: a tag per word (first piece)
    text_to_text    {"input": str, "target": str}             encoder_decoder family
    causal_lm       {"text": str}                             decoder family: continued pretraining

    python -m llmjax.data.tasks doc_vs_code --out DIR   # DIR/train.jsonl, DIR/validation.jsonl
    python -m llmjax.data.tasks docstring_to_name --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from llmjax import storage
from llmjax.data import corpus
from llmjax.data.vocab import BOS_ID, CLS_ID, EOS_ID, PAD_ID, SEP_ID

TASKS = ("classification", "tagging", "text_to_text", "causal_lm")
TASK_FAMILY = {"classification": "encoder", "tagging": "encoder", "text_to_text": "encoder_decoder",
               "causal_lm": "decoder"}
FIELDS = {"classification": ("text", "label"), "tagging": ("tokens", "tags"), "text_to_text": ("input", "target"),
          "causal_lm": ("text",)}


LINE = "__line__"  # read_rows notes each row's line number here, for later messages


class TaskDataError(ValueError):
    """A task file that cannot be used; the message names the file and line."""


# ------------------------------------------------------------------------------------------- reading
def read_rows(path: str | os.PathLike, task: str) -> list[dict]:
    """The rows of a task JSONL file, each checked: valid JSON object, the task's fields with the right
    types (tags as many as tokens). Blank lines are skipped. Errors name `file:line`."""
    if task not in TASKS:
        raise TaskDataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = storage.path(path)  # a local file or a gs:// object
    if not path.is_file():
        raise TaskDataError(f"task data file {path} does not exist")
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{where}: expected a JSON object with fields {FIELDS[task]}, got "
                                    f"{type(row).__name__}")
            missing = [k for k in FIELDS[task] if k not in row]
            if missing:
                raise TaskDataError(f"{where}: missing field(s) {missing}; a {task} row needs {list(FIELDS[task])}")
            _check_row(row, task, where)
            row[LINE] = n
            rows.append(row)
    if not rows:
        raise TaskDataError(f"{path} holds no rows")
    return rows


def _check_row(row: dict, task: str, where: str) -> None:
    def need(ok, msg):
        if not ok:
            raise TaskDataError(f"{where}: {msg}")

    if task in ("classification", "causal_lm"):
        need(isinstance(row["text"], str) and row["text"].strip(), "field 'text' must be a non-empty string")
    if task == "classification":
        need(isinstance(row["label"], (str, int)) and not isinstance(row["label"], bool),
             f"field 'label' must be a string or an integer, got {row['label']!r}")
    if task == "tagging":
        toks, tags = row["tokens"], row["tags"]
        need(isinstance(toks, list) and toks and all(isinstance(t, str) and t for t in toks),
             "field 'tokens' must be a non-empty list of non-empty strings")
        need(isinstance(tags, list) and all(isinstance(t, (str, int)) for t in tags),
             "field 'tags' must be a list of strings")
        need(len(toks) == len(tags), f"{len(toks)} tokens but {len(tags)} tags; give one tag per token")
    if task == "text_to_text":
        need(isinstance(row["input"], str) and row["input"].strip(), "field 'input' must be a non-empty string")
        need(isinstance(row["target"], str), "field 'target' must be a string")


def label_vocabulary(rows: Sequence[dict], task: str) -> list[str]:
    """Sorted distinct labels (classification) or tags (tagging) of the training rows, as strings."""
    if task == "classification":
        return sorted({str(r["label"]) for r in rows})
    if task == "tagging":
        return sorted({str(t) for r in rows for t in r["tags"]})
    return []


def _label_ids(rows, task, labels, path) -> None:
    """Fail naming file and line on a label the training file never had."""
    index = set(labels)
    for n, r in enumerate(rows, 1):
        found = [str(r["label"])] if task == "classification" else [str(t) for t in r["tags"]]
        bad = [x for x in found if x not in index]
        if bad:
            raise TaskDataError(f"{path}:{r.get(LINE, n)}: label {bad[0]!r} does not occur in the training file "
                                f"(labels: {', '.join(labels)})")


# ------------------------------------------------------------------------------------------ encoding
def encode_rows(rows: Sequence[dict], task: str, tokenizer, labels: Sequence[str], *, max_length: int,
                target_length: int = 0, source: str = "<rows>") -> dict[str, np.ndarray]:
    """Rows -> fixed-length int32 arrays [N, max_length] (+ [N, target_length] targets for text_to_text),
    with segment_ids 1 on real tokens and 0 on padding, positions 0, 1, ...; too long inputs are cut.

    classification: inputs, segment_ids, positions, token_type_ids, labels [N], label_weights [N]
    tagging:        the same with tags / tag_weights [N, L] (weight 1 on the first piece of every word)
    text_to_text:   encoder_inputs/_segment_ids/_positions [N, L]; decoder_inputs (pad-started targets),
                    decoder_targets (target + eos), decoder_weights, decoder_segment_ids, decoder_positions
    causal_lm:      inputs ([bos] + text), targets (text + [eos]), weights, segment_ids, positions"""
    if task in ("classification", "tagging"):
        _label_ids(rows, task, labels, source)
    index = {x: i for i, x in enumerate(labels)}
    n, L = len(rows), max_length
    out: dict[str, np.ndarray] = {}

    def zeros(*shape):
        return np.zeros(shape, np.int32)

    if task in ("classification", "tagging", "causal_lm"):
        out.update(inputs=zeros(n, L), segment_ids=zeros(n, L), positions=zeros(n, L))
    if task == "classification":
        out.update(token_type_ids=zeros(n, L), labels=zeros(n), label_weights=np.ones(n, np.float32))
        for i, ids in enumerate(tokenizer.encode_batch([r["text"] for r in rows])):
            _put(out, i, [CLS_ID] + ids[: L - 2] + [SEP_ID])
            out["labels"][i] = index[str(rows[i]["label"])]
    elif task == "tagging":
        out.update(token_type_ids=zeros(n, L), tags=zeros(n, L), tag_weights=np.zeros((n, L), np.float32))
        for i, r in enumerate(rows):
            ids, tags, firsts = [CLS_ID], [], []
            for j, (word, tag) in enumerate(zip(r["tokens"], r["tags"])):
                pieces = tokenizer.encode(word if j == 0 else " " + word) or [tokenizer.encode(word)[0]]
                if len(ids) + len(pieces) > L - 1:
                    break  # words that do not fit are cut, with their tags
                firsts.append(len(ids))
                tags.append(index[str(tag)])
                ids += pieces
            _put(out, i, ids + [SEP_ID])
            out["tags"][i, firsts] = tags
            out["tag_weights"][i, firsts] = 1.0
    elif task == "text_to_text":
        T = target_length
        out.update(encoder_inputs=zeros(n, L), encoder_segment_ids=zeros(n, L), encoder_positions=zeros(n, L),
                   decoder_inputs=zeros(n, T), decoder_targets=zeros(n, T), decoder_segment_ids=zeros(n, T),
                   decoder_positions=zeros(n, T), decoder_weights=np.zeros((n, T), np.float32))
        enc = tokenizer.encode_batch([r["input"] for r in rows])
        dec = tokenizer.encode_batch([r["target"] for r in rows])
        for i, (x, y) in enumerate(zip(enc, dec)):
            x = x[: L - 1] + [EOS_ID]
            out["encoder_inputs"][i, :len(x)] = x
            out["encoder_segment_ids"][i, :len(x)] = 1
            out["encoder_positions"][i, :len(x)] = np.arange(len(x))
            y = (y + [EOS_ID])[:T]
            out["decoder_targets"][i, :len(y)] = y
            out["decoder_inputs"][i, :len(y)] = [PAD_ID] + y[:-1]  # T5: the decoder starts from pad
            out["decoder_segment_ids"][i, :len(y)] = 1
            out["decoder_positions"][i, :len(y)] = np.arange(len(y))
            out["decoder_weights"][i, :len(y)] = 1.0
    elif task == "causal_lm":
        out.update(targets=zeros(n, L), weights=np.zeros((n, L), np.float32))
        for i, ids in enumerate(tokenizer.encode_batch([r["text"] for r in rows])):
            seq = [BOS_ID] + ids[:L] + ([EOS_ID] if len(ids) < L else [])  # L + 1 tokens at most
            m = len(seq) - 1
            _put(out, i, seq[:-1])
            out["targets"][i, :m] = seq[1:]
            out["weights"][i, :m] = 1.0
    else:
        raise TaskDataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return out


def _put(out: dict, i: int, ids: list[int]) -> None:
    out["inputs"][i, :len(ids)] = ids
    out["segment_ids"][i, :len(ids)] = 1
    out["positions"][i, :len(ids)] = np.arange(len(ids))


def example_weight_key(task: str) -> str:
    """The array whose zeros mark padding rows (they contribute nothing to losses or metrics)."""
    return {"classification": "label_weights", "tagging": "tag_weights", "text_to_text": "decoder_weights",
            "causal_lm": "weights"}[task]


# ------------------------------------------------------------------------------------------ batching
def num_rows(arrays: dict) -> int:
    return len(next(iter(arrays.values())))


def train_batches(arrays: dict, batch_size: int, seed: int, start: int = 0) -> Iterator[dict]:
    """Endless batches of `batch_size` rows, reshuffled every epoch (seeded, so batch k is always the same);
    starts at batch `start` (resume). With fewer rows than a batch, rows repeat within the batch."""
    n = num_rows(arrays)
    per_epoch = max(n // batch_size, 1)
    k = start
    while True:
        epoch, i = divmod(k, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        if n < batch_size:
            order = np.resize(order, batch_size)
        rows = order[i * batch_size:(i + 1) * batch_size]
        yield {key: v[rows] for key, v in arrays.items()}
        k += 1


def eval_batches(arrays: dict, batch_size: int, weight_key: str) -> Iterator[dict]:
    """Every row once, in order; the last batch is filled with copies of row 0 whose weights are 0."""
    n = num_rows(arrays)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        pad = batch_size - len(rows)
        batch = {k: v[np.concatenate([rows, np.zeros(pad, int)])] for k, v in arrays.items()}
        if pad:
            batch[weight_key] = batch[weight_key].copy()
            batch[weight_key][len(rows):] = 0
        yield batch


# -------------------------------------------------------------------------------- doc-vs-code task
def _passages(text: str, kind: str, size: int) -> list[str]:
    """Cut a document into passages of about `size` characters at line (code) or paragraph (docs) breaks,
    so both classes look alike in length and neither starts mid-line."""
    units = text.split("\n\n") if kind == "doc" else text.splitlines()
    sep = "\n\n" if kind == "doc" else "\n"
    out, cur = [], ""
    for u in units:
        if not u.strip():
            continue
        cur = f"{cur}{sep}{u}" if cur else u
        if len(cur) >= size:
            out.append(cur[: 2 * size])
            cur = ""
    if len(cur) >= size // 3:
        out.append(cur)
    return out


def _module_of(origin: str) -> str:
    """'json/__init__.py:dumps' -> 'json/__init__.py'; topics -> their own name."""
    return origin.rsplit(":", 1)[0] if not origin.startswith("pydoc_data") else origin


def _split_of_module(module: str, validation_fraction: float, seed: int) -> str:
    """'validation' for a seeded-hash fraction of source modules, else 'train'."""
    h = hashlib.blake2b(module.encode(), digest_size=8, key=str(seed).encode()).digest()
    return "validation" if int.from_bytes(h, "little") < validation_fraction * 2.0**64 else "train"


def doc_vs_code(out: str | os.PathLike, *, per_class: int = 1500, validation_fraction: float = 0.2,
                passage_chars: int = 400, seed: int = 0) -> dict:
    """Write OUT/train.jsonl and OUT/validation.jsonl: passages of the default corpus labelled 'doc' or
    'code' (llmjax.data.corpus Document.kind), balanced (the same number per class in each file), split by
    source module (a seeded hash), so validation passages come from modules never seen in training."""
    split_rows: dict[str, dict[str, list[str]]] = {"train": {"doc": [], "code": []},
                                                    "validation": {"doc": [], "code": []}}
    for d in corpus.documents():
        split = _split_of_module(_module_of(d.origin), validation_fraction, seed)
        split_rows[split][d.kind] += _passages(d.text, d.kind, passage_chars)
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, by_kind in split_rows.items():
        ratio = validation_fraction / (1 - validation_fraction)  # validation rows in the modules' proportion
        want = per_class if split == "train" else max(int(per_class * ratio), 1)
        k = min(want, *(len(v) for v in by_kind.values()))
        rows = [{"text": t, "label": kind} for kind, texts in by_kind.items()
                for t in (texts[i] for i in sorted(rng.choice(len(texts), k, replace=False)))]
        rng.shuffle(rows)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        stats[split] = {"rows": len(rows), "per_class": k, "available": {c: len(v) for c, v in by_kind.items()}}
    (out / "README.json").write_text(json.dumps({"task": "doc_vs_code", "passage_chars": passage_chars,
                                                 "seed": seed, **stats}, indent=2) + "\n")
    return stats


# ----------------------------------------------------------------------------- docstring -> name task
def docstring_to_name_rows(*, validation_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """{"train": rows, "validation": rows} of the text_to_text task docstring -> name: the first paragraph of a
    public stdlib function's or class's docstring -> its name (llmjax.data.corpus.docstring_names), split by
    source module (a seeded hash, as doc_vs_code), so no validation pair comes from a fine-tuning module."""
    rows: dict[str, list[dict]] = {"train": [], "validation": []}
    for module, name, summary in corpus.docstring_names():
        rows[_split_of_module(module, validation_fraction, seed)].append({"input": summary, "target": name})
    return rows


def docstring_to_name(out: str | os.PathLike, *, validation_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write OUT/train.jsonl and OUT/validation.jsonl of the docstring -> name task (docstring_to_name_rows);
    `llmjax finetune --config configs/finetune/text_to_text.py` trains on them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, rows in docstring_to_name_rows(validation_fraction=validation_fraction, seed=seed).items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        stats[split] = {"rows": len(rows)}
    return stats


def main(argv: Sequence[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m llmjax.data.tasks", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    d = sub.add_parser("doc_vs_code", help="documentation-vs-code passages of the default corpus")
    d.add_argument("--out", required=True, help="directory for train.jsonl and validation.jsonl")
    d.add_argument("--per-class", type=int, default=1500, help="training passages per class")
    d.add_argument("--passage-chars", type=int, default=400)
    d.add_argument("--validation-fraction", type=float, default=0.2, help="of source modules held out")
    d.add_argument("--seed", type=int, default=0)
    n = sub.add_parser("docstring_to_name", help="text_to_text pairs: a docstring's summary -> the name")
    n.add_argument("--out", required=True, help="directory for train.jsonl and validation.jsonl")
    n.add_argument("--validation-fraction", type=float, default=0.2, help="of source modules held out")
    n.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    if ns.task == "docstring_to_name":
        for split, s in docstring_to_name(ns.out, validation_fraction=ns.validation_fraction, seed=ns.seed).items():
            print(f"{ns.out}/{split}.jsonl: {s['rows']} pairs")
        return 0
    stats = doc_vs_code(ns.out, per_class=ns.per_class, validation_fraction=ns.validation_fraction,
                        passage_chars=ns.passage_chars, seed=ns.seed)
    for split, s in stats.items():
        print(f"{ns.out}/{split}.jsonl: {s['rows']} passages ({s['per_class']} per class; available "
              f"{s['available']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
