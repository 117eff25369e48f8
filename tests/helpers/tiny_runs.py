"""Tiny pretrained runs for the fine-tuning and decoding tests: `llmjax train` on a counting corpus
("four five six seven ...", weekdays, months), so that even a few seconds of training learn a pattern whose
continuation can be checked ("three four five" -> "six seven eight"). Trained once per test process."""

from __future__ import annotations

import atexit
import functools
import pathlib
import random
import shutil
import tempfile

from helpers.cli_process import run_cli

ROOT = pathlib.Path(__file__).parent.parent.parent
NUMBERS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
           "seventeen eighteen nineteen twenty").split()
DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = "january february march april may june july august september october november december".split()
CONFIGS = {"decoder": "gpt_tiny", "encoder": "bert_tiny", "encoder_decoder": "t5_tiny"}
VOCAB = 400


@functools.lru_cache(maxsize=None)
def base_dir() -> pathlib.Path:
    d = pathlib.Path(tempfile.mkdtemp(prefix="llmjax_tiny_runs_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def counting_lines(n: int, seed: int = 0) -> list[str]:
    """Runs of 6-16 consecutive words of a cycle (numbers one..twenty, weekdays, months)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        seq = r.choice([NUMBERS, NUMBERS, DAYS, MONTHS])
        s, k = r.randrange(len(seq)), r.randint(6, 16)
        out.append(" ".join(seq[(s + i) % len(seq)] for i in range(k)))
    return out


@functools.lru_cache(maxsize=None)
def corpus_file() -> pathlib.Path:
    path = base_dir() / "counting.txt"
    path.write_text("\n".join(counting_lines(2000)) + "\n")
    return path


# The encoder's masked-token task needs more steps, tokens (and a gentler rate for its post-norm blocks).
STEPS = {"decoder": 60, "encoder": 300, "encoder_decoder": 100}
ROWS = {"decoder": (16, 32), "encoder": (32, 64), "encoder_decoder": (16, 32)}  # batch size, row length
LEARNING_RATE = {"decoder": 3e-3, "encoder": 1e-3, "encoder_decoder": 3e-3}


def train_args(family: str, workdir, steps: int | None = None, *extra) -> list[str]:
    steps = steps or STEPS[family]
    return [
        "llmjax", "train", f"--config={ROOT / 'configs' / CONFIGS[family]}.py", f"--workdir={workdir}",
        f"--config.data.sources=('{corpus_file()}',)", "--config.data.text_split=line",
        "--config.data.tokenizer_type=bpe", f"--config.data.vocab_size={VOCAB}", "--config.data.num_sentinels=8",
        f"--config.data.data_dir={base_dir() / 'data'}", f"--config.model.vocab_size={VOCAB}",
        "--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.num_layers=2",
        "--config.model.num_heads=4", "--config.model.max_length=64", f"--config.train.seq_length={ROWS[family][1]}",
        f"--config.train.batch_size={ROWS[family][0]}", "--config.train.num_samples=0", "--config.train.log_every=10",
        "--config.train.eval_every=1000", "--config.train.eval_batches=1", "--config.train.checkpoint_every=0",
        "--config.optim.warmup_steps=5", f"--config.optim.learning_rate={LEARNING_RATE[family]}",
        f"--config.train.steps={steps}",
        *(["--config.model.head_dim=16", "--config.model.num_decoder_layers=2",
           "--config.model.relative_max_distance=32"] if family == "encoder_decoder" else []),
        *extra,
    ]


@functools.lru_cache(maxsize=None)
def tiny_run(family: str) -> pathlib.Path:
    """A training workdir of a tiny `family` model trained on the counting corpus."""
    workdir = base_dir() / f"pretrained_{family}"
    run_cli(train_args(family, workdir)[1:], devices=2)
    return workdir


CYCLES = {"number": NUMBERS, "day": DAYS, "month": MONTHS}


def write_task_files(directory, n_train: int = 200, n_validation: int = 48, seed: int = 1) -> dict:
    """Task JSONL files over the counting corpus: classification (which cycle a run is from), tagging (the
    cycle of every word of mixed runs), text_to_text (4 words -> the next 2), causal_lm (runs).
    Returns {task: (train path, validation path)}."""
    import json

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    r = random.Random(seed)

    def run(seq, k):
        s = r.randrange(len(seq))
        return [seq[(s + i) % len(seq)] for i in range(k)]

    def row(task):
        if task == "classification":
            label = r.choice(sorted(CYCLES))
            return {"text": " ".join(run(CYCLES[label], r.randint(3, 8))), "label": label}
        if task == "tagging":
            tokens, tags = [], []
            for _ in range(r.randint(1, 3)):
                label = r.choice(sorted(CYCLES))
                words = run(CYCLES[label], r.randint(1, 3))
                tokens += words
                tags += [label] * len(words)
            return {"tokens": tokens, "tags": tags}
        if task == "text_to_text":
            words = run(CYCLES[r.choice(sorted(CYCLES))], 6)
            return {"input": " ".join(words[:4]), "target": " ".join(words[4:])}
        return {"text": " ".join(run(CYCLES[r.choice(sorted(CYCLES))], r.randint(5, 12)))}

    out = {}
    for task in ("classification", "tagging", "text_to_text", "causal_lm"):
        paths = []
        for split, n in (("train", n_train), ("validation", n_validation)):
            path = directory / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps(row(task)) + "\n" for _ in range(n)))
            paths.append(path)
        out[task] = tuple(paths)
    return out


@functools.lru_cache(maxsize=None)
def tokenizer_file() -> pathlib.Path:
    """A BPE tokenizer of the counting corpus (trained in a fraction of a second)."""
    from llmjax.data.tokenizer import train_tokenizer

    tok = train_tokenizer(counting_lines(2000), vocab_size=VOCAB, num_sentinels=8, model_type="bpe",
                          character_coverage=1.0)
    return tok.save(base_dir() / "counting_tokenizer.model")


TINY_MODEL = dict(vocab_size=VOCAB, d_model=32, mlp_dim=64, num_layers=2, num_heads=4, max_length=64)


@functools.lru_cache(maxsize=None)
def random_export(family: str, **model) -> pathlib.Path:
    """An export directory (config.json + params/ + tokenizer.model) of an untrained tiny `family` model, as
    `llmjax export` writes it: a fast stand-in for a pretrained run."""
    import shutil

    import orbax.checkpoint as ocp
    from flax import nnx

    from llmjax.config import load_config
    from llmjax.models.config import ModelConfig
    from llmjax.models.transformer import build_model

    cfg = load_config(ROOT / "configs" / f"{CONFIGS[family]}.py")
    cfg.model.update({**TINY_MODEL, **model})
    if family == "encoder_decoder":
        cfg.model.update(head_dim=8, num_decoder_layers=2, relative_max_distance=32)
    cfg.data.vocab_size = VOCAB
    out = base_dir() / f"export_{family}_{abs(hash(tuple(sorted(model.items()))))}"
    built = nnx.jit(lambda: build_model(ModelConfig.from_dict(cfg.model), 0))()
    with ocp.StandardCheckpointer() as w:
        w.save(out.absolute() / "params", nnx.state(built, nnx.Param).to_pure_dict(), force=True)
    (out / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")
    shutil.copyfile(tokenizer_file(), out / "tokenizer.model")
    return out
