"""`llmjax compare --grid configs/compare/objectives.py --workdir runs/compare`: which architecture and
pretraining objective work best for a corpus and a compute budget.

Every cell of the grid (a model family x an objective) trains on the same prepared corpus and tokenizer with
the same optimizer and seed for the same number of training FLOPs (`llmjax.models.flops.train_flops`, counted
the same way for every family: the steps of a cell are budget / FLOPs of one of its batches). Then four
yardsticks, computed the same way for every cell, make the objectives comparable:

1. continuation perplexity: held-out windows of `window_length` tokens are split in half; the model scores
   the second half given the first (decoder: one causal sequence; encoder-decoder: first half in the
   encoder). Cells first get the same short LM adaptation (`lm_adapt_steps` more steps: causal LM for
   decoders, prefix LM for encoder-decoders, as Wang et al. 2022 did for non-causal models; the causal-LM
   cell simply trains those steps more). Encoder-only models have no left-to-right factorisation: n/a.
2. span infilling accuracy: one span of `infill_span` tokens in the middle of each held-out window, hidden
   in each model's own format (BERT: [MASK] tokens; span corruption: a sentinel, right context visible;
   causal / prefix LM: the left context only); the teacher-forced accuracy on the span's tokens.
3. probe accuracy: passages of `probe_length` tokens classified as documentation or source code (the
   corpus's document kinds); the pretrained model plus a linear head on its mean-pooled last hidden states
   (decoder stack / encoder) is fine-tuned for `probe_steps` steps; accuracy on held-out documents.
4. downstream: every cell is fine-tuned for `downstream_steps` steps on one text-to-text task, docstring ->
   name (llmjax.downstream, each family in its own format), then writes the names of
   `downstream_eval_examples` held-out docstrings: the fraction written exactly (name exact match) and the
   teacher-forced accuracy on the names' tokens (name token accuracy, the partial credit).
   downstream_steps=0 leaves this yardstick out (n/a).

With `seeds` N > 1 (grid.seeds or --seeds) every cell runs N times, train.seed = grid.seed + k for seed k
(model init, data order, LM adaptation and probe all follow it); the table shows mean ± standard deviation and
marks the cells separated from the best beyond their spread (`separated`).

Outputs in WORKDIR: RESULTS.md (one row per cell), results.json, loss_vs_flops.png (each cell's own
training loss against FLOPs) and yardsticks.png. Seed 0 of a cell runs in WORKDIR/cells/<name>/ (the
directory of a single-seed grid), seed k > 0 in WORKDIR/cells/<name>/seed<k>/. Finished seed runs
(cell.json) are skipped when the grid runs again, an interrupted one resumes from its checkpoint, and a
failed one is reported without stopping the others and retried the next time.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import checkpoint, downstream, loop
from llmjax import sharding as shd
from llmjax import storage
from llmjax.config import base_config, load_config, objective_config_for
from llmjax.data import pipeline, tasks
from llmjax.data.pipeline import batch_spec
from llmjax.data.prepare import default_data_config, prepare
from llmjax.data.shards import TOKENIZER_FILE, TokenShards
from llmjax.data.tokenizer import Tokenizer
from llmjax.metrics import read_metrics, save_figure
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.flops import train_flops
from llmjax.models.layers import Linear, count_params
from llmjax.models.transformer import build_model
from llmjax.objectives import (
    MIXTURES,
    PREFIX_OBJECTIVES,
    decoder_example,
    encoder_decoder_example,
    losses,
    make_objective,
)
from llmjax.objectives.span_corruption import corrupt
from llmjax.state import TrainState, make_optimizer, replicated_state
from llmjax.step import batch_shardings, global_batch, make_eval_step, make_train_step
from llmjax.train import train_and_evaluate

log = logging.getLogger("llmjax")

CELLS = "cells"
CELL_RESULT = "cell.json"
YARDSTICKS = ("continuation_ppl", "infill_accuracy", "probe_accuracy", "name_exact_match", "name_token_accuracy")
METRICS = ("own_loss",) + YARDSTICKS  # aggregated over seeds (mean, std)
LOWER_IS_BETTER = {"continuation_ppl"}


# ------------------------------------------------------------------------------------------------ grid
def default_grid() -> ml_collections.ConfigDict:
    """The fields a grid file sets (its get_grid() starts from this)."""

    g = ml_collections.ConfigDict()
    g.budget_flops = 1e13  # training FLOPs of every cell
    g.seed = 0  # train.seed of seed 0; seed k trains with seed + k
    g.seeds = 1  # runs per cell (--seeds overrides)
    g.data = default_data_config()
    g.train = ml_collections.ConfigDict(dict(batch_size=16, seq_length=128, log_every=10, eval_every=0,
                                             eval_batches=8, checkpoint_every=0, num_samples=0))
    g.optim = ml_collections.ConfigDict(dict(learning_rate=2e-3, warmup_steps=20, schedule="cosine"))
    g.yardsticks = ml_collections.ConfigDict(dict(
        window_length=96, eval_windows=256, eval_batch_size=32, infill_span=3,
        lm_adapt_steps=40, lm_adapt_learning_rate=1e-3,
        probe_length=24, probe_train_examples=1024, probe_eval_examples=512, probe_steps=60,
        probe_batch_size=32, probe_learning_rate=5e-4,
        downstream_steps=60, downstream_batch_size=32, downstream_learning_rate=1e-3, downstream_input_length=32,
        downstream_target_length=8, downstream_eval_examples=256))
    g.cells = []  # dicts: name, objective, model (ModelConfig fields), optional objective_args, train
    return g


def load_grid(path) -> ml_collections.ConfigDict:

    try:
        grid = load_config(path, "get_grid", "configs/compare/objectives.py", "--grid")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    check_grid(grid)
    return grid


def check_grid(grid) -> None:
    if not grid.cells:
        raise ConfigError("grid.cells is empty: list the (family, objective) cells to compare")
    names = [c["name"] for c in grid.cells]
    for c in grid.cells:
        for key in ("name", "objective", "model"):
            if key not in c:
                raise ConfigError(f"grid.cells: cell {c.get('name', c)!r} has no {key!r}")
        if not c["name"].replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"grid.cells: cell name {c['name']!r} must be letters, digits, '.', '-' or '_'")
    vocab = {dict(c["model"]).get("vocab_size") for c in grid.cells}
    if len(vocab) != 1:
        raise ConfigError(f"grid.cells: every cell must use the same model.vocab_size (one tokenizer), got {vocab}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"grid.cells: names must be unique, {dup} repeat")
    if grid.budget_flops <= 0:
        raise ConfigError(f"grid.budget_flops must be > 0, got {grid.budget_flops}")
    seeds = grid.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"grid.seeds (--seeds) must be an integer >= 1, got {seeds!r}")


def seed_dir(workdir, name: str, k: int):
    """The run directory of seed k of cell `name`: seed 0 keeps the single-seed layout."""
    out = storage.path(workdir) / CELLS / name
    return out if k == 0 else out / f"seed{k}"


def cell_config(grid, cell: dict, data_root, k: int = 0) -> ml_collections.ConfigDict:
    """The run config of seed k of one cell: its model and objective, the grid's shared data/train/optim
    sections, train.seed = grid.seed + k (init and data order), and the number of steps that spends
    grid.budget_flops (steps set by `budget_steps`)."""

    cfg = base_config(objective=cell["objective"], **dict(cell["model"]))
    cfg.data.update(grid.data.to_dict())
    cfg.data.vocab_size = cfg.model.vocab_size
    cfg.data.data_dir = str(data_root)
    cfg.train.update(grid.train.to_dict())
    cfg.train.update(dict(cell.get("train", {})))
    cfg.train.seed = int(grid.seed) + k
    cfg.optim.update(grid.optim.to_dict())
    for k, v in dict(cell.get("objective_args", {})).items():
        cfg.objective_args[k] = v
    ModelConfig.from_dict(cfg.model)  # named errors for a bad model section
    return cfg


def flops_per_step(cfg, ids) -> float:
    """Training FLOPs of one global batch of this config: every row a full packed example."""

    model_cfg = ModelConfig.from_dict(cfg.model)
    objective = make_objective(cfg.objective, ids, model_cfg.family, **objective_config_for(cfg))
    lengths = {k: v.shape[1] for k, v in batch_spec(objective, 1).items() if len(v.shape) == 2}
    enc_len = lengths.get("encoder_inputs", lengths.get("inputs"))
    return cfg.train.batch_size * train_flops(model_cfg, enc_len, lengths.get("decoder_inputs"))


def budget_steps(cfg, ids, budget: float) -> tuple[int, float]:
    per_step = flops_per_step(cfg, ids)
    steps = max(1, int(round(budget / per_step)))
    return steps, per_step


# ------------------------------------------------------------------------------------- the whole grid
def compare(grid, workdir, *, max_cells: int | None = None, progress: bool = False) -> dict:
    """Run every unfinished seed run of every cell (at most `max_cells` runs), then write the outputs from all
    finished ones. Returns the results dict written to results.json."""

    workdir = storage.path(workdir)  # a local directory or a gs:// URL
    workdir.mkdir(parents=True, exist_ok=True)
    check_grid(grid)
    data_root = workdir / "data"
    for cell in grid.cells:  # a mistake in any cell's model section stops the grid before anything runs
        try:
            cell_config(grid, dict(cell), data_root)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"grid cell {cell['name']!r}: {e}") from None
    first = cell_config(grid, grid.cells[0], data_root)
    manifest = prepare(first.data, workdir, progress=progress)
    data_dir = storage.path(manifest["dir"])
    tokenizer = Tokenizer.load(data_dir / TOKENIZER_FILE)
    run_pending(grid, workdir, lambda cell, k, out: run_cell(grid, cell, out, data_root, data_dir, tokenizer, k=k,
                                                             progress=progress), max_cells=max_cells)
    results = collect(grid, workdir)
    write_outputs(results, workdir)
    return results


def run_pending(grid, workdir, run_one, *, max_cells: int | None = None) -> int:
    """Call run_one(cell, k, out) for every seed run without a cell.json (at most `max_cells` of them),
    writing its result to out/cell.json or its error to out/error.txt. Returns how many ran."""
    ran = 0
    for cell in grid.cells:
        cell = dict(cell)
        for k in range(int(grid.get("seeds", 1))):
            out = seed_dir(workdir, cell["name"], k)
            label = cell["name"] + (f" seed {k}" if k else "")
            if (out / CELL_RESULT).exists():
                log.info("cell %s: finished earlier, skipping (%s)", label, out / CELL_RESULT)
                continue
            if max_cells is not None and ran >= max_cells:
                log.info("cell %s: not run (--max-cells %d reached); run the command again to continue", label,
                         max_cells)
                continue
            ran += 1
            try:
                _write_json(out / CELL_RESULT, run_one(cell, k, out))
            except Exception as e:  # one bad cell must not lose the others
                log.error("cell %s failed: %s", label, e)
                out.mkdir(parents=True, exist_ok=True)
                first = (str(e).splitlines() or [""])[0][:300]
                (out / "error.txt").write_text(f"{type(e).__name__}: {first}\n\n{traceback.format_exc()}")
    return ran


def collect(grid, workdir) -> dict:
    """One row per cell: its per-seed results ("runs") and, over the finished ones, the mean of every metric
    (under the metric's name, so a single-seed row reads as before) and its standard deviation
    ("<metric>_std"); then `mark_separated` over the cells."""
    rows = []
    seeds = int(grid.get("seeds", 1))
    for cell in grid.cells:
        runs = []
        for k in range(seeds):
            out = seed_dir(workdir, cell["name"], k)
            run = {"seed_index": k, "seed": int(grid.seed) + k}
            if (out / CELL_RESULT).exists():
                run.update(json.loads((out / CELL_RESULT).read_text()), status="done")
            elif (out / "error.txt").exists():
                run.update(status="failed", error=(out / "error.txt").read_text().splitlines()[0])
            else:
                run.update(status="pending")
            runs.append(run)
        rows.append(aggregate(cell, runs))
    mark_separated(rows)
    return {"budget_flops": float(grid.budget_flops), "seed": int(grid.seed), "seeds": seeds,
            "yardsticks": grid.yardsticks.to_dict(), "cells": rows}


def aggregate(cell: dict, runs: list[dict]) -> dict:
    """A cell's row from its seed runs (dicts with "status" and, when done, run_cell's result). Status: "done"
    when every run is, else "failed" if one failed, else "pending". The fields that do not vary with the seed
    (params, steps, FLOPs, ...) come from the first finished run; "seconds" is the sum over the runs."""
    done = [r for r in runs if r["status"] == "done"]
    failed = [r for r in runs if r["status"] == "failed"]
    row = {}
    if done:
        row.update({k: v for k, v in done[0].items() if k not in ("seed_index", "seed", "status", "error")})
        row["seconds"] = sum(r["seconds"] for r in done)
    row.update(name=cell["name"], objective=cell["objective"],
               family=row.get("family") or dict(cell["model"]).get("family"))
    row["status"] = "done" if len(done) == len(runs) else "failed" if failed else "pending"
    if failed:
        row["error"] = (f"seed {failed[0]['seed_index']}: " if len(runs) > 1 else "") + failed[0]["error"]
    row["seeds_done"] = len(done)
    for key in METRICS:
        vals = [r[key] for r in done if r.get(key) is not None]
        row[key] = float(np.mean(vals)) if vals else None
        row[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    row["runs"] = runs
    return row


def mark_separated(rows: list[dict]) -> None:
    """row["separated"][yardstick] = True for every finished cell whose mean is farther from the best cell's
    mean (lowest perplexity, highest accuracy) than the sum of their two standard deviations; False for the
    others, the best included. Only with 2 or more seeds: otherwise there is no spread and no mark."""
    for r in rows:
        r["separated"] = {}
    for key in YARDSTICKS:
        scored = [r for r in rows if r["status"] == "done" and r.get(key) is not None
                  and r.get(key + "_std") is not None]
        if len(scored) < 2:
            continue
        pick = min if key in LOWER_IS_BETTER else max
        best = pick(scored, key=lambda r: r[key])
        for r in scored:
            r["separated"][key] = abs(best[key] - r[key]) > best[key + "_std"] + r[key + "_std"]


# ------------------------------------------------------------------------------------------ one cell
def run_cell(grid, cell: dict, out: Path, data_root: Path, data_dir: Path, tokenizer, *, k: int = 0,
             progress: bool = False) -> dict:
    """Train seed k of one cell in `out` and measure its yardsticks."""
    t0 = time.time()
    cfg = cell_config(grid, cell, data_root, k)
    steps, per_step = budget_steps(cfg, tokenizer.special_ids, float(grid.budget_flops))
    cfg.train.steps = steps
    if not cfg.train.eval_every:
        cfg.train.eval_every = max(1, steps // 4)
    if not cfg.train.checkpoint_every:
        cfg.train.checkpoint_every = max(1, steps // 4)
    log.info("cell %s: %s + %s, %d steps x %.3g FLOPs = %.3g FLOPs", cell["name"], cfg.model.family,
             cfg.objective, steps, per_step, steps * per_step)
    summary = train_and_evaluate(cfg, out, progress=progress)
    clock = {"train": time.time() - t0}
    state, step, _ = checkpoint.load_latest(out)
    model_cfg = ModelConfig.from_dict(cfg.model)
    model = _model_from(model_cfg, state)
    ys = grid.yardsticks
    windows = validation_windows(data_dir, ys)
    infill_objective, mode = cfg.objective, None
    if cfg.objective in MIXTURES:  # probed in the format of one of its denoisers, with its mode token
        infill_objective, mode = make_objective(cfg.objective, tokenizer.special_ids, model_cfg.family,
                                                **objective_config_for(cfg)).infill_format()
    t = time.time()

    def lap(name):  # seconds of each yardstick, in the result
        nonlocal t
        clock[name], t = time.time() - t, time.time()

    infill = infill_accuracy(model, infill_objective, windows, tokenizer.special_ids, ys, mode=mode,
                             prefix_lm=bidirectional_prefix(cfg))
    lap("infill_accuracy")
    probe = probe_accuracy(model_cfg, state, cfg, data_dir, tokenizer, ys, seed=int(cfg.train.seed))
    lap("probe_accuracy")
    names = (downstream_scores(model_cfg, state, cfg, tokenizer, ys, seed=int(cfg.train.seed))
             if int(ys.downstream_steps) > 0 else {"exact_match": None, "token_accuracy": None})
    lap("downstream")
    ppl = None
    if model_cfg.family != "encoder":
        adapted = lm_adapt(model_cfg, state, cfg, data_dir, ys)
        ppl = continuation_perplexity(adapted, windows, tokenizer.special_ids, ys)
        lap("continuation_ppl")
    log.info("cell %s: seconds %s", cell["name"], {k: round(v, 1) for k, v in clock.items()})
    rows = read_metrics(out)
    curve = [(r["step"] * per_step, r["train/loss"]) for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    return {
        "name": cell["name"], "family": model_cfg.family, "objective": cfg.objective, "seed": int(cfg.train.seed),
        "params": count_params(state.params), "steps": steps, "flops_per_step": per_step,
        "train_flops": steps * per_step, "final_step": step,
        "own_loss": eval_rows[-1]["eval/loss"] if eval_rows else summary.get("eval", {}).get("loss"),
        "continuation_ppl": ppl, "infill_accuracy": infill, "probe_accuracy": probe,
        "name_exact_match": names["exact_match"], "name_token_accuracy": names["token_accuracy"], "curve": curve,
        "seconds": time.time() - t0, "phase_seconds": clock,
    }


def _model_from(model_cfg: ModelConfig, state):

    graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, 0)), nnx.Param, ...)
    return nnx.merge(graphdef, state.params, state.rest, copy=True)


# ------------------------------------------------------------------------------------- held-out data
def validation_windows(data_dir: Path, ys) -> np.ndarray:
    """[N, window_length]: the first `eval_windows` non-overlapping windows of `window_length` tokens of the
    validation split."""

    val = TokenShards(data_dir, "validation")
    n, out = int(ys.window_length), []
    for i in range(len(val)):
        doc = val[i]
        for s in range(0, len(doc) - n + 1, n):
            out.append(doc[s:s + n])
            if len(out) == ys.eval_windows:
                return np.stack(out)
    if not out:
        raise ConfigError(f"yardsticks.window_length={n}: no validation document is that long")
    return np.stack(out)


def _decoder_rows(pairs, ids, prefix_lm: bool, scored=None) -> dict:
    """(prefix, target) pairs -> a padded decoder batch; weights on the target tokens (or on `scored`
    positions of the target, a per-row slice)."""

    rows = []
    for i, (p, t) in enumerate(pairs):
        ex = decoder_example(np.asarray(p, np.int32), np.asarray(t, np.int32), ids.bos, with_prefix_mask=prefix_lm)
        if scored is not None:
            w = np.zeros_like(ex["weights"])
            w[len(p) + scored[i].start: len(p) + scored[i].stop] = 1.0
            ex["weights"] = w
        rows.append(ex)
    return downstream.pad_rows(rows)


def _encdec_rows(pairs, ids, scored=None) -> dict:

    rows = []
    for i, (e, t) in enumerate(pairs):
        ex = encoder_decoder_example(np.asarray(e, np.int32), np.asarray(t, np.int32), start=ids.pad)
        if scored is not None:
            w = np.zeros_like(ex["decoder_weights"])
            w[scored[i]] = 1.0
            ex["decoder_weights"] = w
        rows.append(ex)
    return downstream.pad_rows(rows)


@nnx.jit
def _scored(model, batch):
    """LossSums (summed cross-entropy, weight, correct) of the weighted target tokens of one batch."""

    family = model.cfg.family
    if family == "decoder":
        logits = model(batch["inputs"], batch["segment_ids"], batch["positions"],
                       prefix_mask=batch.get("prefix_mask"))
        return losses.cross_entropy(logits, batch["targets"], batch["weights"])
    if family == "encoder_decoder":
        logits = model(batch["encoder_inputs"], batch["decoder_inputs"], batch["encoder_segment_ids"],
                       batch["decoder_segment_ids"], batch["encoder_positions"], batch["decoder_positions"])
        return losses.cross_entropy(logits, batch["decoder_targets"], batch["decoder_weights"])
    out = model(batch["inputs"], batch["segment_ids"], batch["positions"], jnp.zeros_like(batch["inputs"]))
    return losses.cross_entropy(out["mlm_logits"], batch["targets"], batch["weights"])


def _score_all(model, batches) -> tuple[float, float, float]:
    loss = weight = correct = 0.0
    for b in batches:
        s = _scored(model, {k: jnp.asarray(v) for k, v in b.items()})
        loss, weight, correct = loss + float(s.loss), weight + float(s.weight), correct + float(s.correct)
    return loss, weight, correct


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# -------------------------------------------------------------------------------------- yardsticks
def bidirectional_prefix(cfg) -> bool:
    """Whether a decoder pretrained on `cfg.objective` saw its inputs as a bidirectional prefix (prefix_mask), so
    that the yardsticks in its format give it one too: prefix LM, every mixture of denoisers (MIXTURES: all of
    a mixture's decoder examples have one, whichever denoiser and mode token), and span corruption unless
    objective_args.bidirectional_inputs is False."""
    return cfg.objective in PREFIX_OBJECTIVES or (
        cfg.objective == "span_corruption" and bool(cfg.objective_args.get("bidirectional_inputs", True)))


def continuation_perplexity(model, windows: np.ndarray, ids, ys) -> float:
    """exp(mean cross-entropy) of the second half of every window given the first half."""
    half = windows.shape[1] // 2
    pairs = [(w[:half], w[half:]) for w in windows]
    if model.cfg.family == "encoder_decoder":
        eos = np.array([ids.eos], np.int32)
        batches = [_encdec_rows([(np.concatenate([p, eos]), t) for p, t in chunk], ids)
                   for chunk in _chunks(pairs, ys.eval_batch_size)]
    else:
        batches = [_decoder_rows(chunk, ids, prefix_lm=False) for chunk in _chunks(pairs, ys.eval_batch_size)]
    loss, weight, _ = _score_all(model, batches)
    return float(math.exp(loss / weight))


def infill_accuracy(model, objective: str, windows: np.ndarray, ids, ys, *, prefix_lm: bool = False,
                    mode: int | None = None) -> float:
    """Teacher-forced accuracy on a span of `infill_span` tokens in the middle of every window, hidden in
    the format of the model's own objective (prefix_lm: a decoder sees the inputs as a bidirectional prefix,
    as bidirectional_prefix says its pretraining did; mode: a mixture's mode token, leading the inputs)."""

    k = int(ys.infill_span)
    n = windows.shape[1]
    a = n // 2
    family = model.cfg.family
    lead = np.array([] if mode is None else [mode], np.int32)
    examples = []
    for w in windows:
        span = w[a:a + k]
        if objective == "mlm":  # [CLS] w with the span as [MASK]s [SEP]
            inputs = np.concatenate([[ids.cls], w[:a], np.full(k, ids.mask), w[a + k:], [ids.sep]]).astype(np.int32)
            targets = np.concatenate([[ids.cls], w, [ids.sep]]).astype(np.int32)
            weights = np.zeros(len(inputs), np.float32)
            weights[1 + a:1 + a + k] = 1.0
            examples.append({"inputs": inputs, "targets": targets, "weights": weights})
        elif objective == "span_corruption":  # the span becomes sentinel 0; targets: sentinel 0, span, eos
            mask = np.zeros(n, bool)
            mask[a:a + k] = True
            inputs, targets = corrupt(w, mask, ids)
            examples.append((np.concatenate([lead, inputs]), targets, slice(1, 1 + k)))
        else:  # causal / prefix LM: the left context, then the span
            examples.append((np.concatenate([lead, w[:a]]), span, slice(0, k)))
    if objective == "mlm":
        batches = [downstream.pad_rows(chunk) for chunk in _chunks(examples, ys.eval_batch_size)]
    elif family == "encoder_decoder":
        eos = np.array([ids.eos], np.int32)
        batches = []
        for chunk in _chunks(examples, ys.eval_batch_size):
            pairs = [(e if objective == "span_corruption" else np.concatenate([e, eos]), t) for e, t, _ in chunk]
            batches.append(_encdec_rows(pairs, ids, scored=[s for _, _, s in chunk]))
    else:
        batches = [_decoder_rows([(e, t) for e, t, _ in chunk], ids, prefix_lm=prefix_lm,
                                 scored=[s for _, _, s in chunk])
                   for chunk in _chunks(examples, ys.eval_batch_size)]
    _, weight, correct = _score_all(model, batches)
    return correct / weight


# ---------------------------------------------------------------------------------------- LM adaptation
def lm_adapt(model_cfg: ModelConfig, state, cfg, data_dir: Path, ys):
    """`lm_adapt_steps` more steps of causal LM (decoder) or prefix LM (encoder-decoder) from `state`'s
    parameters with a fresh optimizer; returns the adapted model."""

    objective = "causal_lm" if model_cfg.family == "decoder" else "prefix_lm"
    length_key = "max_length"
    seq = int(cfg.train.seq_length)
    obj_cfg = {length_key: seq if model_cfg.family == "decoder" else max(seq // 2, 3)}
    it = pipeline.make_train_iterator(data_dir, objective, global_batch_size=int(cfg.train.batch_size),
                                      seed=int(cfg.train.seed) + 1, family=model_cfg.family, objective_config=obj_cfg)
    steps = int(ys.lm_adapt_steps)
    optim = ml_collections.ConfigDict(cfg.optim.to_dict())
    optim.update(learning_rate=float(ys.lm_adapt_learning_rate), warmup_steps=min(10, steps // 4), schedule="constant")
    mesh = shd.make_mesh(shd.mesh_config())
    fitted = _fit(_model_from(model_cfg, state), optim, steps, (next(it) for _ in range(steps)),
                  mesh)
    it.close() if hasattr(it, "close") else None
    return fitted


def _fit(model, optim_cfg, steps: int, batches, mesh, *, loss_fn=None, weights_fn=None):
    """`steps` steps of the shared training loop on `model` (parameters replicated: the small models of a
    comparison; nothing written, no evaluation), returning the trained model."""
    tx = make_optimizer(optim_cfg, steps)
    graphdef, state, state_sh = replicated_state(model, tx, mesh)
    first = next(batches)
    step_fn = make_train_step(graphdef, tx, state_sh, batch_shardings(mesh, first), loss_fn=loss_fn,
                              weights_fn=weights_fn)
    tc = ml_collections.ConfigDict(dict(steps=steps, log_every=steps, eval_every=steps))
    result = loop.fit(step_fn, loop.Start(graphdef, state, state_sh), batches, tc, mesh, first_batch=first,
                      progress=False, desc="adapt")
    return loop.model_of(graphdef, result.state)


# ------------------------------------------------------------------------------------------- the probe
class Probe(nnx.Module):
    """A pretrained model + a linear head on the mean of its last hidden states over the real tokens
    (decoder: the decoder stack; encoder and encoder-decoder: the encoder)."""

    def __init__(self, backbone, num_classes: int, *, rngs: nnx.Rngs):
        self.backbone = backbone
        self.cfg = backbone.cfg
        self.head = Linear(self.cfg.d_model, num_classes, axes=("embed", None), use_bias=True,
                           init_std=self.cfg.init_std, rngs=rngs)

    def features(self, tokens, segment_ids, positions, deterministic=True):
        b = self.backbone
        if self.cfg.family == "decoder":
            x, _ = b.hidden(tokens, segment_ids, positions, deterministic=deterministic)
        else:
            x = b.encode(tokens, segment_ids, positions, deterministic=deterministic)
        real = (segment_ids > 0).astype(jnp.float32)[..., None]
        return jnp.sum(x.astype(jnp.float32) * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)

    def __call__(self, tokens, segment_ids, positions, deterministic=True):
        return self.head(self.features(tokens, segment_ids, positions, deterministic)).astype(jnp.float32)


def _probe_loss(model, batch, *, label_smoothing=0.0, z_loss=0.0, deterministic=True):

    logits = model(batch["inputs"], batch["segment_ids"], batch["positions"], deterministic)
    sums = losses.cross_entropy(logits, batch["labels"], batch["label_weights"], label_smoothing=label_smoothing)
    return sums.loss, {"probe": sums}


def _probe_weights(batch):
    return {"probe": jnp.sum(batch["label_weights"].astype(jnp.float32))}


def probe_examples(shards, kinds: tuple[str, str], length: int, count: int, seed: int, *, start: int | None):
    """`count` passages of `length` tokens, half of each kind, from distinct documents where possible,
    each preceded by the token `start` unless None; (tokens [count, L(+1)], labels [count]) shuffled."""
    rng = np.random.default_rng(seed)
    per_kind = count // 2
    tokens, labels = [], []
    for label, kind in enumerate(kinds):
        docs = [i for i in range(len(shards)) if shards.kind(i) == kind and shards.lengths[i] >= length]
        if not docs:
            raise ConfigError(f"yardsticks.probe_length={length}: no {kind!r} document in {shards.split} is that long")
        order = rng.permutation(len(docs))
        for j in range(per_kind):
            doc = shards[docs[order[j % len(docs)]]]
            start = int(rng.integers(0, len(doc) - length + 1))
            tokens.append(doc[start:start + length])
            labels.append(label)
    tokens, labels = np.stack(tokens), np.array(labels, np.int32)
    if start is not None:
        tokens = np.concatenate([np.full((len(tokens), 1), start, np.int32), tokens], 1)
    perm = rng.permutation(len(tokens))
    return tokens[perm], labels[perm]


def probe_accuracy(model_cfg: ModelConfig, state, cfg, data_dir: Path, tokenizer, ys, *, seed: int) -> float:
    """Fine-tune the pretrained model + a linear head to tell documentation from code; held-out accuracy."""

    train_sh, val_sh = TokenShards(data_dir, "train"), TokenShards(data_dir, "validation")
    kinds = ("doc", "code")
    if not all(k in train_sh.kind_names for k in kinds):
        raise ConfigError(f"the probe needs documentation and code documents (kinds {kinds}); this corpus has "
                          f"{train_sh.kind_names}")
    ids = tokenizer.special_ids
    start = {"encoder": ids.cls, "decoder": ids.bos}.get(model_cfg.family)  # as in pretraining; T5: none
    L = int(ys.probe_length)
    x_train, y_train = probe_examples(train_sh, kinds, L, int(ys.probe_train_examples), seed, start=start)
    x_val, y_val = probe_examples(val_sh, kinds, L, int(ys.probe_eval_examples), seed + 1, start=start)
    bs = int(ys.probe_batch_size)
    mesh = shd.make_mesh(shd.mesh_config())

    def batch(x, y):
        return {"inputs": x, "segment_ids": np.ones_like(x), "positions": np.broadcast_to(
            np.arange(x.shape[1], dtype=np.int32), x.shape).copy(), "labels": y,
            "label_weights": np.ones(len(y), np.float32)}

    rng = np.random.default_rng(seed + 2)

    def train_batches():
        for _ in range(int(ys.probe_steps)):
            idx = rng.choice(len(x_train), bs, replace=False)
            yield batch(x_train[idx], y_train[idx])

    probe = Probe(_model_from(model_cfg, state), len(kinds), rngs=nnx.Rngs(params=seed))
    optim = ml_collections.ConfigDict(cfg.optim.to_dict())
    optim.update(learning_rate=float(ys.probe_learning_rate), warmup_steps=min(10, int(ys.probe_steps) // 4),
                 schedule="constant")
    tuned = _fit(probe, optim, int(ys.probe_steps), train_batches(), mesh, loss_fn=_probe_loss,
                 weights_fn=_probe_weights)
    graphdef, params, rest = nnx.split(tuned, nnx.Param, ...)
    state_tree = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=())
    state_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), state_tree)
    correct = weight = 0.0
    n = (len(x_val) // bs) * bs
    eval_fn = None
    for i in range(0, n, bs):
        b = global_batch(batch(x_val[i:i + bs], y_val[i:i + bs]), mesh)
        if eval_fn is None:
            eval_fn = make_eval_step(graphdef, state_sh, jax.tree.map(lambda a: a.sharding, b), loss_fn=_probe_loss)
        s = eval_fn(state_tree, b)["probe"]
        correct, weight = correct + float(s.correct), weight + float(s.weight)
    return correct / weight


# ------------------------------------------------------------------------------------ the downstream task
@functools.lru_cache(maxsize=1)
def _docstring_to_name_rows() -> dict:
    return tasks.docstring_to_name_rows()


def downstream_format(cfg, ids, family: str, ys) -> downstream.Format:
    """How a cell reads the downstream task: a mixture leads with the mode token of its prefix-LM denoiser
    (UL2's mode switching for a sequence-to-sequence task); a decoder reads the input as a bidirectional
    prefix when its pretraining did."""
    mode = None
    if cfg.objective in MIXTURES:
        _, mode = make_objective(cfg.objective, ids, family, **objective_config_for(cfg)).format_for(
            ("prefix_lm", "span_corruption", "causal_lm"))
    return downstream.Format(family, int(ys.downstream_input_length), int(ys.downstream_target_length), mode,
                             prefix_lm=family == "decoder" and bidirectional_prefix(cfg))


def downstream_scores(model_cfg: ModelConfig, state, cfg, tokenizer, ys, *, seed: int) -> dict:
    """Fine-tune the pretrained model for `downstream_steps` on docstring -> name (llmjax.downstream); the exact
    match of its greedy names and its teacher-forced token accuracy on `downstream_eval_examples` held-out pairs
    (the same pairs for every cell and seed; the fine-tuning batches follow the seed)."""
    ids = tokenizer.special_ids
    fmt = downstream_format(cfg, ids, model_cfg.family, ys)
    rows = _docstring_to_name_rows()
    train = downstream.encode(rows["train"], tokenizer, fmt)
    held_out = downstream.encode(rows["validation"], tokenizer, fmt)
    pick = np.random.default_rng(0).permutation(len(held_out))[:int(ys.downstream_eval_examples)]
    held_out = [held_out[i] for i in sorted(pick)]
    steps, bs = int(ys.downstream_steps), int(ys.downstream_batch_size)
    rng = np.random.default_rng(seed + 3)
    batches = (downstream.batch([train[j] for j in rng.choice(len(train), bs, replace=False)], ids, fmt)
               for _ in range(steps))
    optim = ml_collections.ConfigDict(cfg.optim.to_dict())
    optim.update(learning_rate=float(ys.downstream_learning_rate), warmup_steps=min(10, steps // 4),
                 schedule="constant")
    tuned = _fit(_model_from(model_cfg, state), optim, steps, batches, shd.make_mesh(shd.mesh_config()))
    return downstream.evaluate(tuned, held_out, ids, fmt, batch_size=int(ys.eval_batch_size))


# ------------------------------------------------------------------------------------------- outputs
def _write_json(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, json.dumps(obj, indent=1) + "\n")


COLUMNS = ("cell", "family", "objective", "params", "steps", "train FLOPs", "own val loss",
           "continuation ppl ↓", "infill acc ↑", "probe acc ↑", "name exact match ↑",
           "name token acc ↑", "minutes", "status")


SEPARATED = "†"  # after a yardstick's value: separated from the best cell beyond both spreads (mark_separated)


def results_table(results: dict) -> str:
    """The markdown table of RESULTS.md: per cell the mean ± standard deviation over its seeds (the mean alone
    with one seed), SEPARATED after a yardstick where mark_separated set it; minutes summed over the seeds."""

    def f(r, key, fmt):
        if r.get(key) is None:
            return "n/a"
        std = r.get(key + "_std")
        mark = SEPARATED if r.get("separated", {}).get(key) else ""
        return format(r[key], fmt) + ("" if std is None else " ± " + format(std, fmt)) + mark

    seeds = int(results.get("seeds", 1))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results["cells"]:
        if r["status"] != "done":
            count = f" ({r.get('seeds_done', 0)}/{seeds} seeds done)" if seeds > 1 else ""
            lines.append(f"| {r['name']} | {r.get('family')} | {r['objective']} | | | | | | | | | | | "
                         f"{r['status']}{count}{': ' + r['error'] if r.get('error') else ''} |")
            continue
        lines.append("| " + " | ".join([
            r["name"], r["family"], r["objective"], f"{r['params'] / 1e6:.2f}M", str(r["steps"]),
            f"{r['train_flops']:.3g}", f(r, "own_loss", ".3f"), f(r, "continuation_ppl", ".1f"),
            f(r, "infill_accuracy", ".3f"), f(r, "probe_accuracy", ".3f"), f(r, "name_exact_match", ".3f"),
            f(r, "name_token_accuracy", ".3f"),
            f"{r['seconds'] / 60:.1f}", "done"]) + " |")
    return "\n".join(lines)


def seed_band(runs: list[dict]) -> tuple[list, list, list, list]:
    """(FLOPs, mean, min, max) of the training loss over the finished seed runs, at the FLOPs every run
    logged (the seeds of a cell log at the same steps)."""
    curves = [dict((float(x), y) for x, y in r["curve"]) for r in runs if r["status"] == "done" and r.get("curve")]
    if not curves:
        return [], [], [], []
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    vals = np.array([[c[x] for x in xs] for c in curves]).reshape(len(curves), len(xs))
    return xs, list(vals.mean(0)), list(vals.min(0)), list(vals.max(0))


def write_outputs(results: dict, workdir) -> None:
    import matplotlib  # heavy: imported by the one function that plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    workdir = storage.path(workdir)
    _write_json(workdir / "results.json", results)
    ys = results["yardsticks"]
    done = [r for r in results["cells"] if r["status"] == "done"]
    seeds = int(results.get("seeds", 1))
    seeds_text = f"seed {results['seed']}"
    spread_text = ""
    if seeds > 1:
        seeds_text = f"{seeds} seeds: train seeds {results['seed']}..{results['seed'] + seeds - 1}"
        spread_text = (f" Values are mean ± standard deviation over the {seeds} seeds; {SEPARATED} marks a "
                       "yardstick where the cell's mean differs from the best cell's by more than the sum of their "
                       "standard deviations.")
    text = [
        "# Objective comparison", "",
        f"Every cell trained for {results['budget_flops']:.3g} FLOPs (same corpus, tokenizer, optimizer, "
        f"{seeds_text}). Yardsticks on held-out text: continuation perplexity of the second half of "
        f"{ys['window_length']}-token windows given the first half, after {ys['lm_adapt_steps']} steps of LM "
        f"adaptation (n/a for encoder-only models); accuracy on a {ys['infill_span']}-token span hidden in each "
        f"model's own format; accuracy of a documentation-vs-code probe ({ys['probe_length']}-token passages, "
        f"{ys['probe_steps']} fine-tuning steps); after {ys.get('downstream_steps', 0)} steps of fine-tuning on "
        f"docstring -> name, the exact match of the names written for {ys.get('downstream_eval_examples', 0)} "
        f"held-out docstrings and the teacher-forced accuracy on their tokens. 'own val loss' is each cell's "
        f"own objective, not comparable across objectives.{spread_text}", "", results_table(results), "",
        "![loss vs FLOPs](loss_vs_flops.png)", "", "![yardsticks](yardsticks.png)", ""]
    (workdir / "RESULTS.md").write_text("\n".join(text))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(done):
        xs, mean, low, high = seed_band(r.get("runs") or [dict(r, status="done")])
        if xs:
            ax.plot(xs, mean, color=f"C{i}", label=r["name"])
            if seeds > 1:  # the spread of the seeds: min to max at every logged step
                ax.fill_between(xs, low, high, color=f"C{i}", alpha=0.2, linewidth=0)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("training loss (own objective)" + (f"; mean, {seeds} seeds' range shaded" if seeds > 1 else ""))
    if done:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, workdir / "loss_vs_flops.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(YARDSTICKS), figsize=(4 * len(YARDSTICKS), 4))
    names = [r["name"] for r in done]
    for ax, key, title in zip(axes, YARDSTICKS, ("continuation perplexity (lower is better)",
                                                  "span infilling accuracy", "doc-vs-code probe accuracy",
                                                  "docstring -> name exact match",
                                                  "docstring -> name token accuracy")):
        vals = [r[key] if r.get(key) is not None else 0.0 for r in done]
        errs = [math.nan if r.get(key + "_std") is None else r[key + "_std"] for r in done]  # nan: no bar
        ax.bar(range(len(done)), vals, color=["C%d" % i for i in range(len(done))],
               yerr=errs if seeds > 1 else None, capsize=3)
        for i, r in enumerate(done):
            if r.get(key) is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(done)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, workdir / "yardsticks.png", dpi=110)
    plt.close(fig)
