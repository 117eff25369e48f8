"""Fine-tuning: task readers (errors name file and line), every task end to end on tiny models, LoRA (base
weights bit-identical, small checkpoints, merged == adapted outputs), merge-lora, the doc-vs-code builder,
and clear errors for bad input."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_runs
from helpers.cli_errors import user_error
from llmjax import checkpoint, cli
from llmjax.data import tasks
from llmjax.data.tokenizer import Tokenizer
from llmjax.cli import merge_lora
from llmjax.finetune import default_finetune_config, finetune
from llmjax.params import flat_values
from llmjax.runs import load_finetuned, read_params_checkpoint

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    return tiny_runs.write_task_files(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(tiny_runs.tokenizer_file())


def config(task, files, **train):
    cfg = default_finetune_config()
    cfg.task = task
    cfg.train_file, cfg.validation_file = map(str, files[task])
    cfg.max_length, cfg.target_length = 24, 8
    cfg.model.dropout_rate = 0.0
    cfg.train.update({"steps": 20, "batch_size": 16, "log_every": 5, "eval_every": 10, **train})
    cfg.optim.update(learning_rate=3e-3, warmup_steps=2)
    return cfg


def run(cfg, init_from, workdir):
    finetune(cfg, init_from, workdir, progress=False)
    return json.loads((pathlib.Path(workdir) / "finetune_results.json").read_text())


# ------------------------------------------------------------------------------------------------ data
def test_task_rows_are_checked_and_errors_name_file_and_line(tmp_path):
    bad = {
        "not json": ('{"text": "a", "label": "x"}\n{oops\n', "classification", ":2: not valid JSON"),
        "missing": ('{"text": "a"}\n', "classification", ":1: missing field(s) ['label']"),
        "tags": ('\n{"tokens": ["a", "b"], "tags": ["X"]}\n', "tagging", ":2: 2 tokens but 1 tags"),
        "empty text": ('{"input": "", "target": "y"}\n', "text_to_text", ":1: field 'input' must be a non-empty"),
        "list": ('[1, 2]\n', "causal_lm", ":1: expected a JSON object"),
    }
    for name, (text, task, message) in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        with pytest.raises(tasks.TaskDataError) as e:
            tasks.read_rows(path, task)
        assert f"{path}{message}" in str(e.value), (name, str(e.value))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(tasks.TaskDataError, match="holds no rows"):
        tasks.read_rows(tmp_path / "blank.jsonl", "causal_lm")
    with pytest.raises(tasks.TaskDataError, match="does not exist"):
        tasks.read_rows(tmp_path / "nope.jsonl", "causal_lm")
    # A validation label the training file never had: named with its file and line.
    (tmp_path / "val.jsonl").write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "z"}\n')
    rows = tasks.read_rows(tmp_path / "val.jsonl", "classification")
    with pytest.raises(tasks.TaskDataError, match=r"val.jsonl:3: label 'z' does not occur in the training file"):
        tasks.encode_rows(rows, "classification", None, ["x", "y"], max_length=8, source=str(tmp_path / "val.jsonl"))


def test_encode_rows_layout_for_every_task(tok):
    enc = tasks.encode_rows([{"text": "three four five", "label": "n"}], "classification", tok, ["d", "n"],
                            max_length=8)
    ids = tok.encode("three four five")
    assert enc["inputs"][0, :len(ids) + 2].tolist() == [4] + ids + [5] and enc["labels"].tolist() == [1]
    assert enc["segment_ids"][0].tolist() == [1] * (len(ids) + 2) + [0] * (8 - len(ids) - 2)

    enc = tasks.encode_rows([{"tokens": ["monday", "three", "four"], "tags": ["day", "num", "num"]}], "tagging",
                            tok, ["day", "num"], max_length=10)
    firsts = np.flatnonzero(enc["tag_weights"][0])
    assert len(firsts) == 3 and firsts[0] == 1 and enc["tags"][0, firsts].tolist() == [0, 1, 1]
    assert tok.decode(enc["inputs"][0, firsts[1]:firsts[2]]).strip() == "three"

    enc = tasks.encode_rows([{"input": "one two", "target": "three"}], "text_to_text", tok, [], max_length=6,
                            target_length=4)
    y = tok.encode("three") + [1]
    assert enc["decoder_targets"][0, :len(y)].tolist() == y
    assert enc["decoder_inputs"][0, :len(y)].tolist() == [0] + y[:-1]  # T5: starts from pad
    assert enc["encoder_inputs"][0, :len(tok.encode("one two")) + 1].tolist() == tok.encode("one two") + [1]

    enc = tasks.encode_rows([{"text": "one two"}], "causal_lm", tok, [], max_length=8)
    x = tok.encode("one two")
    assert enc["inputs"][0, :len(x) + 1].tolist() == [3] + x
    assert enc["targets"][0, :len(x) + 1].tolist() == x + [1] and enc["weights"][0].sum() == len(x) + 1

    # Evaluation batches cover every row once; padding rows weigh nothing.
    arrays = {"labels": np.arange(5), "label_weights": np.ones(5, np.float32)}
    batches = list(tasks.eval_batches(arrays, 4, "label_weights"))
    assert [b["label_weights"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_doc_vs_code_builder_is_balanced_and_split_by_module(tmp_path):
    stats = tasks.doc_vs_code(tmp_path, per_class=200, passage_chars=300)
    train = tasks.read_rows(tmp_path / "train.jsonl", "classification")
    val = tasks.read_rows(tmp_path / "validation.jsonl", "classification")
    for rows in (train, val):
        labels = [r["label"] for r in rows]
        assert labels.count("doc") == labels.count("code") > 0
    assert stats["train"]["rows"] == 400 and len(val) == stats["validation"]["rows"]
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    assert all(100 <= len(r["text"]) <= 600 for r in train)


# ------------------------------------------------------------------------------- fine-tuning end to end
@pytest.fixture(scope="module")
def full_classification(task_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls_full")
    return out, run(config("classification", task_files), tiny_runs.random_export("encoder"), out)


def test_classification_full_finetune_learns_and_is_loadable(full_classification):
    out, res = full_classification
    assert res["task"] == "classification" and res["labels"] == ["day", "month", "number"]
    assert res["validation"]["accuracy"] > res["chance_accuracy"] + 0.15, res
    assert res["validation"]["loss"] < res["validation_start"]["loss"]
    assert res["trainable_parameters"] == res["total_parameters"] and res["base_unchanged"] is None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in r for r in rows) and any("train/loss" in r for r in rows)
    # A fully fine-tuned workdir is an ordinary training workdir: load_latest / export work.
    state, step, cfg = checkpoint.load_latest(out)
    assert step == 20 and cfg["model"]["num_labels"] == 3
    assert "classifier" in state.params
    # The pretrained weights moved (full fine-tuning), starting from the export's values.
    base = read_params_checkpoint(tiny_runs.random_export("encoder") / "params")
    tuned = flat_values(state.params)
    key = "encoder/layers/0/mlp/wi/kernel"
    assert not np.array_equal(base[key], np.asarray(tuned[key]))


def test_lora_trains_only_adapters_and_head_and_merges_exactly(full_classification, task_files, tmp_path, capsys):
    base_dir = tiny_runs.random_export("encoder")
    cfg = config("classification", task_files)
    cfg.lora.update(rank=4, alpha=8.0, targets=["q", "v", "mlp"])
    cfg.optim.learning_rate = 1e-2  # adapters on an untrained base: a higher rate
    out = tmp_path / "lora"
    res = run(cfg, base_dir, out)
    assert res["validation"]["loss"] < res["validation_start"]["loss"], res
    assert res["trainable_parameters"] < 0.2 * res["total_parameters"]
    assert res["base_unchanged"] is True  # checked on the final training state itself
    info = json.loads((out / "finetune.json").read_text())
    assert info["saved"] == "trainable" and "classifier/kernel" in info["trainable"]
    assert all(k.endswith(("lora_a", "lora_b")) or k.startswith("classifier/") for k in info["trainable"])

    # Loaded back (export's base + saved adapters): the base is the pretrained one; adapters and head moved.
    base = read_params_checkpoint(base_dir / "params")
    model, _ = load_finetuned(out)
    tuned = {k: np.asarray(v) for k, v in flat_values(nnx.state(model, nnx.Param)).items()}
    assert set(base) < set(tuned)
    for k, v in base.items():
        assert np.array_equal(v, tuned[k]), k
    assert np.abs(tuned["encoder/layers/0/self_attn/q/lora_b"]).max() > 0  # B starts at zero
    assert np.abs(tuned["encoder/layers/1/mlp/wo/lora_b"]).max() > 0

    # The checkpoint holds the adapters + head (+ their optimizer state) only: much smaller on disk.
    full_out, full_res = full_classification
    assert res["checkpoint_bytes"] * 4 < full_res["checkpoint_bytes"], (res["checkpoint_bytes"],
                                                                         full_res["checkpoint_bytes"])
    saved = read_params_checkpoint(out / "checkpoints" / "20" / "state")
    assert set(saved) == set(info["trainable"])

    # merge-lora: W + (alpha / r) A B, written as an export directory; same outputs as the adapted model.
    merged_dir = tmp_path / "merged"
    assert merge_lora.main(["--base", str(base_dir), "--adapters", str(out), "--out", str(merged_dir)]) == 0
    merged, merged_cfg = checkpoint.load_exported(merged_dir)
    assert merged_cfg["model"]["lora_rank"] == 0 and merged.cfg.num_labels == 3
    assert not any(k.endswith("lora_a") for k in flat_values(nnx.state(merged, nnx.Param)))
    tok = Tokenizer.load(merged_dir / "tokenizer.model")
    arrays = tasks.encode_rows(tasks.read_rows(cfg.validation_file, "classification"), "classification", tok,
                               res["labels"], max_length=24)
    args = [jnp.asarray(arrays[k][:16]) for k in ("inputs", "segment_ids", "positions", "token_type_ids")]
    a, b = nnx.jit(lambda m, *x: m(*x))(model, *args), nnx.jit(lambda m, *x: m(*x))(merged, *args)
    for key in ("class_logits", "mlm_logits", "hidden"):
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(a["class_logits"])).max() > 1e-2  # not trivially equal


def test_tagging_end_to_end(task_files, tmp_path):
    res = run(config("tagging", task_files), tiny_runs.random_export("encoder"), tmp_path / "tag")
    assert res["labels"] == ["day", "month", "number"]
    assert res["validation"]["accuracy"] > res["chance_accuracy"] + 0.1, res
    assert res["validation"]["loss"] < res["validation_start"]["loss"]


@pytest.mark.slow  # compiles T5 training, evaluation and greedy decoding: ~30 s on 2 cores
def test_text_to_text_with_lora_reports_exact_match_and_generates(task_files, tmp_path, capsys):
    from llmjax.cli import generate as generate_command

    cfg = config("text_to_text", task_files, steps=30)
    cfg.lora.update(rank=4, targets=["q", "k", "v", "o", "mlp"])
    cfg.optim.learning_rate = 1e-2  # adapters on an untrained base: a higher rate
    res = run(cfg, tiny_runs.random_export("encoder_decoder"), tmp_path / "t2t")
    assert 0.0 <= res["validation"]["exact_match"] <= 1.0
    assert res["validation"]["loss"] < res["validation_start"]["loss"] - 0.2, res
    assert res["validation_start"]["exact_match"] == 0.0
    capsys.readouterr()
    assert generate_command.main(["--workdir", str(tmp_path / "t2t"), "--prompt", "monday tuesday wednesday thursday",
                          "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "encoder_decoder model" in out and "[1] monday tuesday wednesday thursday => " in out


def test_causal_lm_continued_training_lowers_validation_loss(task_files, tmp_path):
    res = run(config("causal_lm", task_files), tiny_runs.random_export("decoder"), tmp_path / "lm")
    assert res["validation"]["loss"] < res["validation_start"]["loss"] - 1.0, res
    assert res["validation"]["perplexity"] == pytest.approx(np.exp(res["validation"]["loss"]), rel=1e-4)
    assert res["trainable_parameters"] == res["total_parameters"] and res["chance_accuracy"] is None


# ---------------------------------------------------------------------------------------------- errors
def test_finetune_command_errors_name_the_flag_or_file(task_files, tmp_path, capsys):
    cls_train, cls_val = map(str, task_files["classification"])

    def fails(*args):
        return user_error(["llmjax", "finetune", f"--config={ROOT / 'configs/finetune/doc_vs_code.py'}", *args], capsys)

    files = [f"--config.train_file={cls_train}", f"--config.validation_file={cls_val}"]
    encoder, decoder = tiny_runs.random_export("encoder"), tiny_runs.random_export("decoder")
    assert "--init-from is required" in fails(f"--workdir={tmp_path / 'a'}", *files)
    assert "--workdir is required" in fails(f"--init-from={encoder}", *files)
    assert f"{tmp_path / 'nope'} does not exist" in fails(f"--init-from={tmp_path / 'nope'}",
                                                          f"--workdir={tmp_path / 'a'}", *files)
    msg = fails(f"--init-from={decoder}", f"--workdir={tmp_path / 'a'}", *files)
    assert "needs a encoder model" in msg or "needs an encoder model" in msg or "model.family='decoder'" in msg, msg
    msg = fails(f"--init-from={encoder}", f"--workdir={tmp_path / 'a'}", f"--config.validation_file={cls_val}",
                f"--config.train_file={tmp_path / 'missing.jsonl'}")
    assert "train_file" in msg and "missing.jsonl does not exist" in msg
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one two", "label": "a"}\n{"text": "three", "labl": "b"}\n')
    msg = fails(f"--init-from={encoder}", f"--workdir={tmp_path / 'a'}", f"--config.train_file={bad}",
                f"--config.validation_file={cls_val}")
    assert f"{bad}:2: missing field(s) ['label']" in msg
    assert "unknown config field" in fails(f"--init-from={encoder}", "--config.lora.rnk=2", *files)
    # merge-lora on a non-LoRA or a non-fine-tuning directory
    with pytest.raises(SystemExit, match="is not a fine-tuning workdir"):
        merge_lora.main(["--base", str(encoder), "--adapters", str(encoder), "--out", str(tmp_path / "m")])


# ----------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run_encoder")  # with test_generate_cli's fill test: tiny_run("encoder") trained once
def test_finetune_from_a_training_workdir(task_files, tmp_path):
    """From `llmjax train`'s workdir (newest checkpoint + the prepared data's tokenizer), with the CLI."""
    pretrained = tiny_runs.tiny_run("encoder")
    out = tmp_path / "cls"
    cfg = ROOT / "configs/finetune/doc_vs_code.py"
    train_file, val_file = task_files["classification"]
    assert cli.main(["llmjax", "finetune", f"--config={cfg}", f"--init-from={pretrained}", f"--workdir={out}",
                     f"--config.train_file={train_file}", f"--config.validation_file={val_file}",
                     "--config.max_length=24", "--config.train.steps=30", "--config.train.batch_size=16",
                     "--config.optim.learning_rate=1e-3", "--config.lora.rank=4"]) == 0
    res = json.loads((out / "finetune_results.json").read_text())
    assert res["validation"]["accuracy"] > res["chance_accuracy"] + 0.2, res
    prepared = next((tiny_runs.base_dir() / "data").glob("*/tokenizer.model"))  # found via the run's config
    assert (out / "tokenizer.model").read_bytes() == prepared.read_bytes()
    assert res["base_unchanged"] is True


def test_finetune_into_a_bucket_workdir(gcs, task_files, tmp_path, monkeypatch):
    """`--workdir gs://...` (a real GCS API server started by the test): the checkpoints, results and config
    go to the bucket, the fine-tuned run loads back from it, and nothing lands in a local `gs:` directory."""
    from etils import epath  # noqa: E402 (the bucket's path type)

    monkeypatch.chdir(tmp_path)
    workdir = "gs://bkt/runs/classify"
    finetune(config("classification", task_files, steps=4, eval_every=4), tiny_runs.random_export("encoder"),
             workdir, progress=False)
    results = json.loads((epath.Path(workdir) / "finetune_results.json").read_text())
    assert results["steps"] == 4 and results["labels"] == ["day", "month", "number"]
    assert 0.0 <= results["validation"]["accuracy"] <= 1.0 and results["checkpoint_bytes"] > 0
    assert checkpoint.Checkpoints(workdir).steps() == [4]
    model, cfg = load_finetuned(workdir)
    assert cfg["finetuned_step"] == 4 and model.cfg.num_labels == 3
    assert not (tmp_path / "gs:").exists()
