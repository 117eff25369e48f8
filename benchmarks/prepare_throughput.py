"""Tokens per second of `llmjax prepare` (llmjax.data.prepare.prepare: read, tokenize, split and write the
shards) against SentencePiece's own `encode` of the same texts with the same tokenizer model and the same
number of threads. JSON in benchmarks/results/<name>.json (default prepare_throughput).

    python -m benchmarks.prepare_throughput [--scale 1,10] [--processes N] [--repeats 3]

The tokenizer is trained once, by a first `prepare` of the default corpus (timed and reported on its own), and
then given as data.tokenizer_model, so the timed runs exclude tokenizer training. Scale 1 is the default
corpus (data.sources empty, as `llmjax prepare` runs out of the box); scale k > 1 is its documents repeated k
times, written as one JSON Lines file into a temporary directory and given as data.sources. Each timed
prepare writes into a fresh data_dir, so it never finds its output already there.

The reference encodes the documents prepare reads (read beforehand, not timed) with
SentencePieceProcessor(model_file=<that tokenizer>).encode(chunk, num_threads=--processes) over chunks of
--spm_chunk documents, counting the tokens: SentencePiece's C++ thread pool, no Python per document, no
writing. llmjax prepare encodes batches of 256 documents with num_threads=os.cpu_count() (llmjax.data.tokenizer
.Tokenizer.encode_batch); it has no process/thread setting of its own, so --processes other than os.cpu_count()
changes the reference only (recorded in the JSON). Per repeat: reading the documents alone, one prepare, then
one reference; medians.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece
from absl import flags

from benchmarks.common import machine_info, parse_flags, table, write_result
from llmjax.data import corpus
from llmjax.data.prepare import default_data_config, documents, prepare
from llmjax.data.shards import TOKENIZER_FILE


def _define(fv):
    flags.DEFINE_list("scale", ["1", "10"], "corpus sizes, in copies of the default corpus", flag_values=fv)
    flags.DEFINE_integer("processes", 0, "SentencePiece encode threads of the reference; 0 = os.cpu_count()",
                         flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed runs of each side per scale (alternating)", flag_values=fv)
    flags.DEFINE_integer("spm_chunk", 4096, "documents per SentencePiece encode call of the reference",
                         flag_values=fv)
    flags.DEFINE_string("tmp_dir", None, "where the corpora and prepared data go (default: the system temp dir)",
                        flag_values=fv)
    flags.DEFINE_string("name", "prepare_throughput", "result name", flag_values=fv)
    flags.DEFINE_bool("save", True, "write benchmarks/results/<name>.json (--nosave for smoke runs)", flag_values=fv)


def data_config(**fields):
    cfg = default_data_config()
    cfg.update(fields)
    return cfg


def corpus_config(scale: int, tokenizer_model: str, tmp: Path):
    """The data config of `scale` copies of the default corpus (scale 1: the default corpus itself)."""
    if scale == 1:
        return data_config(tokenizer_model=tokenizer_model)
    path = tmp / f"corpus_x{scale}.jsonl"
    if not path.exists():
        with path.open("w") as f:
            lines = [json.dumps({"text": d.text}) + "\n" for d in corpus.documents()]
            for _ in range(scale):
                f.writelines(lines)
    return data_config(tokenizer_model=tokenizer_model, sources=[str(path)], source_type="jsonl")


def time_prepare(cfg, data_dir: Path) -> tuple[float, dict]:
    cfg = data_config(**{**cfg.to_dict(), "data_dir": str(data_dir)})
    t = time.perf_counter()
    manifest = prepare(cfg, progress=False)
    dt = time.perf_counter() - t
    shutil.rmtree(data_dir)
    return dt, manifest


def time_sentencepiece(sp, texts: list[str], threads: int, chunk: int) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for i in range(0, len(texts), chunk):
        n += sum(map(len, sp.encode(texts[i:i + chunk], num_threads=threads)))
    return time.perf_counter() - t, n


def main(argv: list[str]) -> int:
    fv = parse_flags(argv, _define, __doc__)
    scales = [int(s) for s in fv.scale]
    if any(s < 1 for s in scales):
        raise SystemExit(f"--scale: copies of the default corpus, each >= 1; got {fv.scale}")
    threads = fv.processes or os.cpu_count()
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="llmjax-prepare-bench-", dir=fv.tmp_dir))
    rows = []
    try:
        # The tokenizer, trained once by a full prepare of the default corpus (training + tokenizing).
        t = time.perf_counter()
        trained = prepare(data_config(data_dir=str(tmp / "trained")), progress=False)
        train_prepare_s = time.perf_counter() - t
        tokenizer_model = str(tmp / "tokenizer.model")
        shutil.copy(Path(trained["dir"]) / TOKENIZER_FILE, tokenizer_model)
        shutil.rmtree(tmp / "trained")
        sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)

        for scale in scales:
            cfg = corpus_config(scale, tokenizer_model, tmp)
            ours, theirs, reads = [], [], []
            for r in range(fv.repeats):
                t = time.perf_counter()
                texts = [text for text, _ in documents(cfg)[1]]
                reads.append(time.perf_counter() - t)
                dt, manifest = time_prepare(cfg, tmp / f"out_x{scale}_{r}")
                ours.append(dt)
                dt, spm_tokens = time_sentencepiece(sp, texts, threads, fv.spm_chunk)
                theirs.append(dt)
            splits = manifest["splits"]
            tokens = sum(s["tokens"] for s in splits.values())
            ours_s, theirs_s, read_s = statistics.median(ours), statistics.median(theirs), statistics.median(reads)
            rows.append({
                "scale": scale,
                "source": "default corpus" if scale == 1 else f"default corpus x{scale}, one JSON Lines file",
                "documents": len(texts),
                "characters": sum(map(len, texts)),
                "tokens": tokens,
                "sentencepiece_tokens": spm_tokens,
                "splits": {s: {k: v[k] for k in ("documents", "tokens")} for s, v in splits.items()},
                "prepare_times_s": ours,
                "sentencepiece_times_s": theirs,
                "prepare_median_s": ours_s,
                "sentencepiece_median_s": theirs_s,
                "prepare_tokens_per_s": tokens / ours_s,
                "sentencepiece_tokens_per_s": spm_tokens / theirs_s,
                "ratio_prepare_over_sentencepiece": (tokens / ours_s) / (spm_tokens / theirs_s),
                # Reading alone (before each prepare, median): the default corpus is built from the stdlib's
                # sources at every read, a JSON Lines corpus is parsed.
                "read_times_s": reads,
                "read_median_s": read_s,
                "prepare_tokens_per_s_without_read": tokens / (ours_s - read_s) if ours_s > read_s else None,
            })
            del texts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "name": fv.name,
        "command": "python -m benchmarks.prepare_throughput " + " ".join(argv[1:]),
        "repeats": fv.repeats,
        "tokenizer": {k: trained["tokenizer"][k] for k in ("vocab_size", "model_type")}
        | {"trained_by_first_prepare_s": train_prepare_s},
        "sentencepiece": {"version": sentencepiece.__version__, "num_threads": threads,
                          "chunk_documents": fv.spm_chunk},
        "prepare_encode_threads": os.cpu_count(),
        "rows": rows,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "machine": machine_info(),
    }
    print(f"{'scale':>5} {'documents':>10} {'tokens':>12} {'prepare s':>10} {'(read s)':>9} {'prepare tok/s':>14} "
          f"{'spm s':>8} {'spm tok/s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['scale']:>5} {r['documents']:>10,} {r['tokens']:>12,} {r['prepare_median_s']:>10.2f} "
              f"{r['read_median_s']:>9.2f} {r['prepare_tokens_per_s']:>14,.0f} {r['sentencepiece_median_s']:>8.2f} "
              f"{r['sentencepiece_tokens_per_s']:>12,.0f} {r['ratio_prepare_over_sentencepiece']:>6.2f}")
    print(table([
        ("prepare", f"llmjax.data.prepare.prepare with data.tokenizer_model (read, tokenize with "
                    f"{os.cpu_count()} threads, split, write shards); median of {fv.repeats}"),
        ("read s", "of prepare s, reading the documents alone (timed before each prepare; the default corpus is "
                   "built from the stdlib's sources)"),
        ("spm", f"SentencePieceProcessor.encode(num_threads={threads}) over chunks of {fv.spm_chunk} documents, "
                "texts in memory"),
        ("ratio", "prepare tokens/s / SentencePiece tokens/s (1 = prepare costs nothing over the bare encode)"),
        ("tokenizer", f"trained by a first prepare of the default corpus in {train_prepare_s:.1f} s (not in the rows)"),
        ("load average 1 min", f"{load_before:.2f} before, {result['load_average_1min']['after']:.2f} after"),
    ]))
    for r in rows:
        if r["tokens"] != r["sentencepiece_tokens"]:
            print(f"note (scale {r['scale']}): prepare wrote {r['tokens']:,} tokens, SentencePiece's encode gave "
                  f"{r['sentencepiece_tokens']:,}")
    if fv.save:
        print(f"wrote {write_result(fv.name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
