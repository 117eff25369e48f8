"""Fine-tuning a pretrained run on a task (classification, tagging, text-to-text, continued causal-LM
training), fully or with LoRA adapters, on the shared training loop (llmjax.loop).

The output workdir holds config.json (the effective config, with the full model section), finetune.json
(task, labels, where the base came from), tokenizer.model, metrics.jsonl, checkpoints/ and
finetune_results.json. With lora.rank > 0 only the adapters and the freshly initialised task head train
(every base weight stays bit-identical) and the checkpoints hold only those, plus their optimizer state.
`llmjax finetune` and `llmjax merge-lora` (llmjax.cli) run it from the command line.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from llmjax import checkpoint as ckpt_lib
from llmjax import loop
from llmjax import sharding as shd
from llmjax import storage
from llmjax.config import check_train_config
from llmjax.data import tasks as task_data
from llmjax.data.shards import TOKENIZER_FILE
from llmjax.data.tokenizer import Tokenizer
from llmjax.generate import generate
from llmjax.loop import default_train_config, describe, model_of
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.transformer import build_model
from llmjax.objectives import losses
from llmjax.params import flat_values, path_str
from llmjax.runs import FINETUNE_INFO, load_pretrained, model_dict
from llmjax.state import default_optim_config, learning_rate_schedule, make_optimizer
from llmjax.step import batch_shardings, global_batch, make_eval_step, make_train_step, metrics_of
from llmjax.workdir import lock_workdir

log = logging.getLogger("llmjax")

RESULTS = "finetune_results.json"


# ----------------------------------------------------------------------------------------------- config
def default_finetune_config() -> ml_collections.ConfigDict:
    """The config of a fine-tuning run; config files under configs/finetune/ start from this."""
    c = ml_collections.ConfigDict()
    c.task = "classification"  # classification | tagging | text_to_text | causal_lm
    c.train_file = ""  # JSONL; see llmjax.data.tasks for each task's fields
    c.validation_file = ""
    c.max_length = 128  # input tokens per example ([CLS] and [SEP] / eos included); longer inputs are cut
    c.target_length = 32  # text_to_text: decoder tokens (eos included); also the exact-match generation limit
    c.tokenizer = ""  # '' = the tokenizer of the pretrained run (or of the export directory)
    c.eval_max_rows = 0  # validation rows used (0 = all)
    # Overrides of the pretrained model's fields (only those that leave the weights' shapes alone).
    c.model = ml_collections.ConfigDict({"dropout_rate": 0.1, "attention_dropout_rate": 0.0})
    c.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "targets": ["q", "v"]})
    c.train = default_train_config()
    c.train.update(steps=200, batch_size=16, log_every=10, eval_every=100, checkpoint_every=0, keep_checkpoints=1)
    c.optim = default_optim_config()
    c.optim.update(learning_rate=1e-4, warmup_steps=20, weight_decay=0.01, schedule="linear", min_lr_ratio=0.0)
    c.mesh = shd.mesh_config()
    c.sharding = shd.sharding_config()
    return c


def _check_config(cfg) -> None:
    if cfg.task not in task_data.TASKS:
        raise ConfigError(f"task: unknown task {cfg.task!r}; choose one of {', '.join(task_data.TASKS)}")
    for field in ("train_file", "validation_file"):
        if not cfg[field]:
            raise ConfigError(f"{field} is empty: set --config.{field}=PATH.jsonl")
        if not storage.path(cfg[field]).is_file():
            raise ConfigError(f"{field}: {cfg[field]} does not exist")
    if cfg.max_length < 3:
        raise ConfigError(f"max_length must be at least 3, got {cfg.max_length}")
    if cfg.task == "text_to_text" and cfg.target_length < 2:
        raise ConfigError(f"target_length must be at least 2 for text_to_text, got {cfg.target_length}")
    if cfg.lora.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0, got {cfg.lora.rank}")
    check_train_config(cfg)  # every number of the train and optim sections


# --------------------------------------------------------------------------------------------- losses
def _freeze(model, trainable: frozenset[str] | None) -> None:
    """Stop gradients at every parameter not in `trainable` (LoRA), so no work is spent on their gradients."""
    if trainable is None:
        return
    frozen = nnx.state(model, lambda path, v: isinstance(v, nnx.Param) and path_str(path) not in trainable)
    nnx.update(model, jax.tree.map(jax.lax.stop_gradient, frozen))


def make_loss_fn(task: str, trainable: frozenset[str] | None = None):
    """loss_fn(model, batch, *, label_smoothing, z_loss, deterministic) -> (sum, {"lm": LossSums}) for
    llmjax.step.make_train_step / make_eval_step; the task's metric is the "lm" part's accuracy."""
    def loss_fn(model, batch, *, label_smoothing=0.0, z_loss=0.0, deterministic=True):
        _freeze(model, trainable)
        kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
        if task in ("classification", "tagging"):
            out = model(batch["inputs"], batch["segment_ids"], batch["positions"], batch["token_type_ids"],
                        deterministic=deterministic)  # XLA drops the unused MLM logits
            if task == "classification":
                sums = losses.cross_entropy(out["class_logits"], batch["labels"], batch["label_weights"], **kw)
            else:
                sums = losses.cross_entropy(out["tag_logits"], batch["tags"], batch["tag_weights"], **kw)
        elif task == "text_to_text":
            logits = model(batch["encoder_inputs"], batch["decoder_inputs"], batch["encoder_segment_ids"],
                           batch["decoder_segment_ids"], batch["encoder_positions"], batch["decoder_positions"],
                           deterministic=deterministic)
            sums = losses.cross_entropy(logits, batch["decoder_targets"], batch["decoder_weights"], **kw)
        else:
            logits = model(batch["inputs"], batch["segment_ids"], batch["positions"], deterministic=deterministic)
            sums = losses.cross_entropy(logits, batch["targets"], batch["weights"], **kw)
        return sums.loss, {"lm": sums}

    return loss_fn


def make_weights_fn(task: str):
    key = task_data.example_weight_key(task)
    return lambda batch: {"lm": jnp.sum(batch[key].astype(jnp.float32))}


# -------------------------------------------------------------------------------------------- the run
def _effective_model_config(cfg, pre_model: dict, labels: list[str]) -> ModelConfig:
    d = dict(pre_model)
    d.update(cfg.model.to_dict())
    d.update(lora_rank=int(cfg.lora.rank), lora_alpha=float(cfg.lora.alpha), lora_targets=tuple(cfg.lora.targets))
    if cfg.task == "classification":
        d["num_labels"] = len(labels)
        if not d.get("pooler", True):
            raise ConfigError("classification needs the pooler ([CLS] -> tanh) but the pretrained model has "
                              "model.pooler=False")
    if cfg.task == "tagging":
        d["num_tags"] = len(labels)
    return ModelConfig.from_dict(d)


def finetune(cfg, init_from, workdir, *, progress: bool = True) -> dict:
    """Fine-tune the parameters of `init_from` on cfg.task; write everything to `workdir`; return the results
    (also in WORKDIR/finetune_results.json)."""
    t0 = time.time()
    _check_config(cfg)
    workdir = storage.path(workdir)  # a local directory or a gs:// URL
    with lock_workdir(workdir):  # one run per workdir: a second one is refused here, before it writes anything
        return _finetune(cfg, init_from, workdir, t0, progress=progress)


def _finetune(cfg, init_from, workdir, t0: float, *, progress: bool) -> dict:
    task = cfg.task
    tc = cfg.train

    # 1. the pretrained parameters, config and tokenizer
    pre_params, pre_cfg, tok_path, described = load_pretrained(init_from)
    family = pre_cfg["model"]["family"]
    if family != task_data.TASK_FAMILY[task]:
        raise ConfigError(f"task={task!r} needs a {task_data.TASK_FAMILY[task]} model, but --init-from {init_from} "
                          f"is a {family} model (model.family={family!r})")
    tok_path = storage.path(cfg.tokenizer) if cfg.tokenizer else tok_path
    if tok_path is None or not tok_path.is_file():
        raise ConfigError(f"cannot find the tokenizer of {init_from}; pass --config.tokenizer=PATH/tokenizer.model")
    tokenizer = Tokenizer.load(tok_path)
    log.info("initialising from %s (%s family, tokenizer %s)", described, family, tok_path)

    # 2. data
    train_rows = task_data.read_rows(cfg.train_file, task)
    val_rows = task_data.read_rows(cfg.validation_file, task)
    if cfg.eval_max_rows:
        val_rows = val_rows[: cfg.eval_max_rows]
    labels = task_data.label_vocabulary(train_rows, task)
    if task in ("classification", "tagging") and len(labels) < 2:
        raise task_data.TaskDataError(f"{cfg.train_file}: only one label ({labels}); classification needs at least 2")
    enc = dict(max_length=int(cfg.max_length), target_length=int(cfg.target_length))
    train_arrays = task_data.encode_rows(train_rows, task, tokenizer, labels, source=cfg.train_file, **enc)
    val_arrays = task_data.encode_rows(val_rows, task, tokenizer, labels, source=cfg.validation_file, **enc)
    model_cfg = _effective_model_config(cfg, pre_cfg["model"], labels)
    if model_cfg.position == "learned" and cfg.max_length > model_cfg.max_length:
        raise ConfigError(f"max_length={cfg.max_length} exceeds the pretrained model.max_length="
                          f"{model_cfg.max_length} (its learned position table); lower --config.max_length")
    log.info("task %s: %d training rows, %d validation rows%s", task, len(train_rows), len(val_rows),
             f", labels {labels}" if labels else "")

    # 3. which parameters train
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, tc.seed))
    shapes = {k: tuple(v.shape) for k, v in flat_values(nnx.state(abstract, nnx.Param)).items()}
    loaded = {k for k, v in pre_params.items() if k in shapes and tuple(v.shape) == shapes[k]}
    fresh = sorted(set(shapes) - loaded)
    lora = model_cfg.lora_rank > 0
    trainable = frozenset(k for k in shapes if k in fresh or k.endswith(("lora_a", "lora_b"))) if lora else None
    heads = [k for k in fresh if not k.endswith(("lora_a", "lora_b"))]
    if heads:
        log.info("freshly initialised (not in the pretrained checkpoint): %s", ", ".join(heads))
    skipped = sorted(k for k in pre_params if k in shapes and k not in loaded)
    if skipped:
        log.warning("pretrained parameters with other shapes, initialised afresh: %s", ", ".join(skipped))
    n_total = sum(int(np.prod(s)) for s in shapes.values())
    n_train = sum(int(np.prod(shapes[k])) for k in trainable) if lora else n_total
    if lora:
        n_adapters = sum(k.endswith(("lora_a", "lora_b")) for k in shapes)
        log.info("LoRA rank %d on %s: training %d adapter matrices + the new head (%s): %s of %s parameters "
                 "(%.2f%%); the base weights are frozen", model_cfg.lora_rank, ",".join(model_cfg.lora_targets),
                 n_adapters, ", ".join(heads) or "none", f"{n_train:,}", f"{n_total:,}", 100 * n_train / n_total)
    else:
        log.info("full fine-tuning: all %s parameters train", f"{n_total:,}")

    # 4. state: the pretrained parameters (or, resuming, the newest checkpoint) on the mesh
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.rules_dict(cfg.sharding.rules)
    shd.validate_layout(model_cfg, mesh, tc.batch_size, tc.micro_batches)
    tx = make_optimizer(cfg.optim, tc.steps, trainable)
    run_cfg = _run_config(cfg, model_cfg, pre_cfg)
    info = {"task": task, "labels": labels, "init_from": str(storage.path(init_from)), "pretrained": described,
            "saved": "trainable" if lora else "all", "trainable": sorted(trainable) if lora else "all",
            "train_file": str(cfg.train_file), "validation_file": str(cfg.validation_file)}
    is_writer = jax.process_index() == 0
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=tc.keep_checkpoints)
    loop.check_resumable(checkpoints, workdir / FINETUNE_INFO, "trainable", info["trainable"])
    start = loop.start_state(model_cfg, tx, mesh, rules, tc.seed, checkpoints=checkpoints, cfg_json=run_cfg,
                             values={k: pre_params[k] for k in loaded}, trainable=trainable, check=False)
    if start.resumed_from is not None:
        log.info("resuming from %s at step %d", start.resumed_from, start.step)
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(run_cfg, indent=2) + "\n")
        (workdir / FINETUNE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (workdir / "command.txt").write_text(" ".join(sys.argv) + "\n")
        if storage.path(tok_path) != workdir / TOKENIZER_FILE:
            storage.path(tok_path).copy(workdir / TOKENIZER_FILE, overwrite=True)

    # 5. steps
    weight_key = task_data.example_weight_key(task)
    batches = task_data.train_batches(train_arrays, tc.batch_size, tc.seed, start=start.step)
    first = next(batches)
    batch_sh = batch_shardings(mesh, first)
    step_fn = make_train_step(start.graphdef, tx, start.state_sh, batch_sh, micro_batches=tc.micro_batches,
                              label_smoothing=tc.label_smoothing, z_loss=tc.z_loss,
                              lr_schedule=learning_rate_schedule(cfg.optim, tc.steps),
                              loss_fn=make_loss_fn(task, trainable), weights_fn=make_weights_fn(task), rules=rules)
    eval_fn = make_eval_step(start.graphdef, start.state_sh, batch_sh, loss_fn=make_loss_fn(task), rules=rules)

    def evaluate(state) -> dict:
        total = None
        for b in task_data.eval_batches(val_arrays, tc.batch_size, weight_key):
            sums = eval_fn(state, global_batch(b, mesh))
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        m = {k: float(v) for k, v in metrics_of(total).items()}
        m.pop("tokens", None)
        if task == "text_to_text":
            m["exact_match"] = exact_match(model_of(start.graphdef, state), tokenizer, val_rows, cfg)
        if task == "causal_lm":
            m["perplexity"] = float(np.exp(min(m["loss"], 50.0)))
        return m

    train_t0 = time.time()
    result = loop.fit(step_fn, start, batches, tc, mesh, first_batch=first, evaluate=evaluate, workdir=workdir,
                      checkpoints=checkpoints, cfg_json=run_cfg, trainable=trainable, eval_at_start=True,
                      data_state=lambda step: {"first_stream": 0, "positions": [step]}, progress=progress,
                      desc="finetune")
    train_seconds = time.time() - train_t0
    state, step = result.state, result.step
    if result.preempted is not None:
        return {"task": task, "steps": step, "preempted_at": step}
    base_unchanged = None
    if lora:  # a check, not an assumption: every frozen weight still equals its pretrained value bit for bit
        base_unchanged = all(bool(jnp.array_equal(v, pre_params[k])) for k, v in flat_values(state.params).items()
                             if k not in trainable)
        log.info("frozen base weights bit-identical to the pretrained ones: %s", base_unchanged)
    ckpt_dir = checkpoints.directory / str(step)
    results = {
        "task": task, "init_from": str(init_from), "steps": step, "lora_rank": model_cfg.lora_rank,
        "trainable_parameters": n_train, "total_parameters": n_total, "base_unchanged": base_unchanged,
        "labels": labels,
        "train_rows": len(train_rows), "validation_rows": len(val_rows),
        "validation_start": result.eval_start, "validation": result.eval, "train": result.train,
        "chance_accuracy": chance_accuracy(task, val_arrays),
        "checkpoint_bytes": (ckpt_lib.stored_array_bytes(ckpt_dir / "state") if (ckpt_dir / "state").is_dir()
                             else None),
        "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - t0, 1),
    }
    if is_writer:
        (workdir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{task}: validation {describe(result.eval_start)} at step {start.step} -> {describe(result.eval)} at step "
          f"{step}" + (f" (chance {results['chance_accuracy']:.3f})" if results["chance_accuracy"] is not None else ""))
    print(f"results: {workdir / RESULTS}")
    return results


def chance_accuracy(task: str, arrays: dict) -> float | None:
    """The accuracy of always answering the most frequent validation label (classification, tagging)."""
    if task == "classification":
        counts = np.bincount(arrays["labels"])
    elif task == "tagging":
        counts = np.bincount(arrays["tags"][arrays["tag_weights"] > 0])
    else:
        return None
    return float(counts.max() / max(counts.sum(), 1))


def exact_match(model, tokenizer, rows, cfg, batch_size: int = 32) -> float:
    """Fraction of rows whose greedy decoding (up to target_length tokens) equals the target text."""
    hits = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [ids[: cfg.max_length - 1] + [1] for ids in tokenizer.encode_batch([r["input"] for r in chunk])]
        prompts += [prompts[0]] * (batch_size - len(prompts))  # one compiled shape for every chunk
        out = generate(model, prompts, max_new_tokens=int(cfg.target_length), method="greedy")
        hits += sum(tokenizer.decode(t).strip() == r["target"].strip() for t, r in zip(out.tokens, chunk))
    return hits / max(len(rows), 1)


def _run_config(cfg, model_cfg: ModelConfig, pre_cfg: dict) -> dict:
    """The effective config: the fine-tuning config with the full model section (so the run can be rebuilt,
    exported and loaded like a training run) and the pretrained run's data section (its tokenizer)."""
    d = json.loads(cfg.to_json_best_effort())
    d["model"] = model_dict(model_cfg)
    d["data"] = pre_cfg.get("data", {})
    return d


