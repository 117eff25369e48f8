"""`llmjax finetune`: fine-tune a pretrained run on a task (classification, tagging, text-to-text, continued
causal-LM training), fully or with LoRA adapters; `llmjax merge-lora`: fold adapters into the base weights.

    llmjax finetune --config configs/finetune/doc_vs_code.py --init-from runs/bert_tiny --workdir runs/dvc
    llmjax merge-lora --base runs/bert_tiny --adapters runs/dvc_lora --out runs/dvc_merged

The output workdir holds config.json (the effective config, with the full model section), finetune.json
(task, labels, where the base came from), tokenizer.model, metrics.jsonl, checkpoints/ and
finetune_results.json. With lora.rank > 0 only the adapters and the freshly initialised task head train
(every base weight stays bit-identical) and the checkpoints hold only those, plus their optimizer state.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from llmjax.data import tasks as task_data
from llmjax.models.config import ConfigError, ModelConfig

log = logging.getLogger("llmjax")

FINETUNE_INFO = "finetune.json"
RESULTS = "finetune_results.json"
TOKENIZER = "tokenizer.model"


# ----------------------------------------------------------------------------------------------- config
def default_finetune_config() -> ml_collections.ConfigDict:
    """The config of a fine-tuning run; config files under configs/finetune/ start from this."""
    from llmjax import sharding, train

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
    c.train = train.default_train_config()
    c.train.update(steps=200, batch_size=16, log_every=10, eval_every=100, checkpoint_every=0, keep_checkpoints=1)
    c.optim = train.default_optim_config()
    c.optim.update(learning_rate=1e-4, warmup_steps=20, weight_decay=0.01, schedule="linear", min_lr_ratio=0.0)
    c.mesh = sharding.mesh_config()
    c.sharding = ml_collections.ConfigDict({"rules": [list(r) for r in sharding.DEFAULT_RULES]})
    return c


def _check_config(cfg) -> None:
    if cfg.task not in task_data.TASKS:
        raise ConfigError(f"task: unknown task {cfg.task!r}; choose one of {', '.join(task_data.TASKS)}")
    for field in ("train_file", "validation_file"):
        if not cfg[field]:
            raise ConfigError(f"{field} is empty: set --config.{field}=PATH.jsonl")
        if not Path(cfg[field]).is_file():
            raise ConfigError(f"{field}: {cfg[field]} does not exist")
    if cfg.max_length < 3:
        raise ConfigError(f"max_length must be at least 3, got {cfg.max_length}")
    if cfg.task == "text_to_text" and cfg.target_length < 2:
        raise ConfigError(f"target_length must be at least 2 for text_to_text, got {cfg.target_length}")
    if cfg.lora.rank < 0:
        raise ConfigError(f"lora.rank must be >= 0, got {cfg.lora.rank}")
    if cfg.train.steps <= 0:
        raise ConfigError(f"train.steps must be positive, got {cfg.train.steps}")


# ------------------------------------------------------------------------------------- flat parameters
def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flat_values(state) -> dict[str, object]:
    """{'encoder/layers/0/mlp/wi/kernel': value} of an nnx.State (arrays, ShapeDtypeStructs or shardings)."""
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def nest(flat: dict[str, object]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        node = out
        *head, last = k.split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def unnest(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(unnest(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_params(state_params, values: dict[str, object]) -> None:
    """Write `values` (by path) into the Variables of an nnx.State, keeping each Variable's sharding."""
    for p, var in nnx.to_flat_state(state_params):
        key = path_str(p)
        if key in values:
            old = var.get_value()
            new = values[key]
            sharding = getattr(old, "sharding", None)
            var.set_value(jax.device_put(jnp.asarray(new, old.dtype), sharding) if sharding is not None
                          else jnp.asarray(new, old.dtype))


# ------------------------------------------------------------------------------------ pretrained runs
def read_params_checkpoint(directory: Path) -> dict[str, np.ndarray]:
    """{path: array} of the `params` of an Orbax state checkpoint, read without a target (any structure)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as r:
        tree = r.restore(Path(directory).absolute())
    tree = tree.get("params", tree)
    flat = unnest(tree)
    return {k.removesuffix("/value"): np.asarray(v) for k, v in flat.items()}


def _newest_state_dir(workdir: Path) -> tuple[Path, int]:
    from llmjax.checkpoint import Checkpoints

    steps = Checkpoints(workdir).steps()
    if not steps:
        raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint")
    return workdir / "checkpoints" / str(steps[0]) / "state", steps[0]


def load_pretrained(source) -> tuple[dict[str, np.ndarray], dict, Path | None, str]:
    """({path: array} parameters, run config, tokenizer file or None, description) of a pretrained
    source: an export directory (config.json + params/), a fine-tuning workdir, or a training workdir."""
    from llmjax import checkpoint as ckpt

    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if (src / ckpt.EXPORT_CONFIG).is_file() and (src / ckpt.EXPORT_PARAMS).is_dir():
        cfg = json.loads((src / ckpt.EXPORT_CONFIG).read_text())
        params = read_params_checkpoint(src / ckpt.EXPORT_PARAMS)
        return params, cfg, find_tokenizer(src, cfg), f"export {src}"
    if (src / FINETUNE_INFO).is_file():
        model, cfg = load_finetuned(src)
        params = {k: np.asarray(v) for k, v in flat_values(nnx.state(model, nnx.Param)).items()}
        if cfg["model"].get("lora_rank"):  # continue from the merged weights
            merged = merge_lora_model(model)
            params = {k: np.asarray(v) for k, v in flat_values(nnx.state(merged, nnx.Param)).items()}
            cfg = {**cfg, "model": _model_dict(merged.cfg)}
        return params, cfg, find_tokenizer(src, cfg), f"fine-tuned run {src}"
    if (src / "checkpoints").is_dir():
        state, step, cfg = ckpt.load_latest(src)
        params = {k: np.asarray(v) for k, v in flat_values(state.params).items()}
        return params, cfg, find_tokenizer(src, cfg), f"checkpoint {src}/checkpoints/{step}"
    raise FileNotFoundError(f"{src} is neither a training workdir (no checkpoints/) nor an export directory "
                            "(config.json + params/)")


def find_tokenizer(directory, cfg: dict) -> Path | None:
    """The tokenizer of a run: DIR/tokenizer.model (exports and fine-tuning runs), data.tokenizer_model, or the
    prepared data of a training workdir (the manifest whose fingerprint matches the run's data config)."""
    directory = Path(directory)
    if (directory / TOKENIZER).is_file():
        return directory / TOKENIZER
    data = cfg.get("data") or {}
    if data.get("tokenizer_model") and Path(data["tokenizer_model"]).is_file():
        return Path(data["tokenizer_model"])
    try:
        from llmjax.data.prepare import data_dir_of
        from llmjax.data.shards import MANIFEST, TOKENIZER_FILE

        base = data_dir_of(ml_collections.ConfigDict(data), directory)
        found = sorted((d for d in base.iterdir() if (d / MANIFEST).is_file() and (d / TOKENIZER_FILE).is_file()),
                       key=lambda d: (d / MANIFEST).stat().st_mtime, reverse=True) if base.is_dir() else []
        want = _data_fingerprint(data)
        for d in found:
            if want and json.loads((d / MANIFEST).read_text()).get("fingerprint") == want:
                return d / TOKENIZER_FILE
        return found[0] / TOKENIZER_FILE if found else None  # the newest prepared data of this run
    except Exception:
        return None


def _data_fingerprint(data: dict) -> str | None:
    """The prepared-data fingerprint of a data config (as llmjax.data.prepare computes it), if cheap."""
    try:
        from llmjax.data import prepare as prep

        cfg = ml_collections.ConfigDict(data)
        files = prep._source_files(cfg) if prep._sources_list(cfg.sources) else None
        tok = prep._load_tokenizer(cfg) if cfg.tokenizer_model else None
        return prep._fingerprint(prep._inputs(cfg, files, tok))
    except Exception:
        return None


def _model_dict(model_cfg: ModelConfig) -> dict:
    import dataclasses

    d = dataclasses.asdict(model_cfg)
    d["lora_targets"] = list(d["lora_targets"])
    return d


# ------------------------------------------------------------------------------------- fine-tuned runs
def load_finetuned(workdir, base=None):
    """(model, config) of a fine-tuning workdir: the model of its config.json with the base parameters
    (`base`, default the run's --init-from) and the newest checkpoint's parameters (all of them, or the LoRA
    adapters and task head) on top."""
    workdir = Path(workdir)
    cfg = json.loads((workdir / "config.json").read_text())
    info = json.loads((workdir / FINETUNE_INFO).read_text())
    model_cfg = ModelConfig.from_dict(cfg["model"])
    state_dir, step = _newest_state_dir(workdir)
    values = read_params_checkpoint(state_dir)
    if info.get("saved") == "trainable":  # LoRA run: the base weights come from the pretrained source
        base_params, _, _, _ = load_pretrained(base or info["init_from"])
        values = {**base_params, **values}
    model = build_with_params(model_cfg, values, int(cfg["train"]["seed"]))
    return model, {**cfg, "finetuned_step": step}


def merge_lora_model(model):
    """A model without adapters whose every adapted kernel is W + (alpha / r) A B; other parameters copied."""
    from llmjax.models.layers import Linear

    merged_cfg = model.cfg.replace(lora_rank=0)
    values = {k: v for k, v in flat_values(nnx.state(model, nnx.Param)).items() if not k.endswith(("lora_a", "lora_b"))}
    for path, module in model.iter_modules():
        if isinstance(module, Linear) and module.lora_rank:
            values[path_str(path) + "/kernel"] = module.merged_kernel()
    merged = build_with_params(merged_cfg, values)
    missing = sorted(set(flat_values(nnx.state(merged, nnx.Param))) - set(values))
    if missing:
        raise ValueError(f"merge-lora: no values for {', '.join(missing[:5])}")
    return merged


# --------------------------------------------------------------------------------------------- losses
def _freeze(model, trainable: frozenset[str] | None) -> None:
    """Stop gradients at every parameter not in `trainable` (LoRA), so no work is spent on their gradients."""
    if trainable is None:
        return
    frozen = nnx.state(model, lambda path, v: isinstance(v, nnx.Param) and path_str(path) not in trainable)
    nnx.update(model, jax.tree.map(jax.lax.stop_gradient, frozen))


def make_loss_fn(task: str, trainable: frozenset[str] | None = None):
    """loss_fn(model, batch, *, label_smoothing, z_loss, deterministic) -> (sum, {"lm": LossSums}) for
    llmjax.train.make_train_step / make_eval_step; the task's metric is the "lm" part's accuracy."""
    from llmjax.objectives import losses

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


# ------------------------------------------------------------------------------------------ optimizer
def make_finetune_optimizer(optim_cfg, steps: int, trainable: frozenset[str] | None):
    """The run's optimizer (llmjax.train.make_optimizer); with `trainable` only those parameters are updated
    (and get optimizer state), every other update is exactly zero."""
    from llmjax.train import make_optimizer

    tx = make_optimizer(optim_cfg, steps)
    if trainable is None:
        return tx
    return only_trainable(tx, trainable)


def only_trainable(tx: optax.GradientTransformation, trainable: frozenset[str]) -> optax.GradientTransformation:
    """Run `tx` on the parameters named in `trainable` only (its state, clipping norm and weight decay see
    nothing else); every other parameter gets an update of exactly zero and has no optimizer state."""
    pick = lambda tree: tree.filter(lambda path, _: path_str(path) in trainable)  # noqa: E731

    def init(params):
        return tx.init(pick(params))

    def update(updates, state, params=None):
        sub, state = tx.update(pick(updates), state, None if params is None else pick(params))
        return nnx.merge_state(jax.tree.map(jnp.zeros_like, updates), sub), state

    return optax.GradientTransformation(init, update)


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


def build_with_params(model_cfg: ModelConfig, values: dict, seed: int = 0):
    """The model of `model_cfg` with the parameters `values` ({path: array}); the others (new heads, adapters)
    initialised as build_model would. Only those are compiled and drawn: an eager or whole random init costs
    seconds even for tiny models."""
    from llmjax.models.transformer import build_model

    abstract = nnx.eval_shape(lambda: build_model(model_cfg, seed))
    graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
    fresh_names = set(flat_values(params)) - set(values)

    @jax.jit
    def fresh():
        _, p, rest = nnx.split(build_model(model_cfg, seed), nnx.Param, ...)
        return {k: v for k, v in flat_values(p).items() if k in fresh_names}, rest

    new, rest = fresh()
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params)
    set_params(params, {**values, **new})
    return nnx.merge(graphdef, params, rest)


def _initial_state(model_cfg: ModelConfig, tx, mesh, rules: dict, seed: int, pretrained: dict):
    """(graphdef, TrainState, shardings): the pretrained parameters where given, fresh ones (heads, adapters)
    elsewhere, fresh optimizer state; placed with the shardings of llmjax.train.init_state_abstract. The
    random init is compiled for the fresh parameters only (compiling all of it costs seconds)."""
    from llmjax import train as tr

    graphdef, _, state_sh = tr.init_state_abstract(model_cfg, tx, mesh, rules, seed)
    _, params, rest = nnx.split(build_with_params(model_cfg, pretrained, seed), nnx.Param, ...)
    params = jax.device_put(params, state_sh.params)
    rest = jax.device_put(rest, state_sh.rest)
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), state_sh.step)
    return graphdef, tr.TrainState(step=step, params=params, rest=rest, opt_state=opt_state), state_sh


def finetune(cfg, init_from, workdir, *, progress: bool = True) -> dict:
    """Fine-tune the parameters of `init_from` on cfg.task; write everything to `workdir`; return the results
    (also in WORKDIR/finetune_results.json)."""
    from tqdm import tqdm

    from llmjax import checkpoint as ckpt_lib
    from llmjax import metrics as mt
    from llmjax import sharding as shd
    from llmjax import train as tr
    from llmjax.data.tokenizer import Tokenizer
    from llmjax.models.transformer import build_model

    t0 = time.time()
    _check_config(cfg)
    workdir = Path(workdir)
    task = cfg.task
    tc = cfg.train

    # 1. the pretrained parameters, config and tokenizer
    pre_params, pre_cfg, tok_path, described = load_pretrained(init_from)
    family = pre_cfg["model"]["family"]
    if family != task_data.TASK_FAMILY[task]:
        raise ConfigError(f"task={task!r} needs a {task_data.TASK_FAMILY[task]} model, but --init-from {init_from} "
                          f"is a {family} model (model.family={family!r})")
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else tok_path
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

    # 4. state
    mesh = shd.make_mesh(cfg.mesh)
    rules = shd.rules_dict(cfg.sharding.rules)
    shd.validate_layout(model_cfg, mesh, tc.batch_size, tc.micro_batches)
    tx = make_finetune_optimizer(cfg.optim, tc.steps, trainable)
    lr_schedule = tr.learning_rate_schedule(cfg.optim, tc.steps)
    graphdef, state, state_sh = _initial_state(model_cfg, tx, mesh, rules, tc.seed,
                                               {k: pre_params[k] for k in loaded})

    def saved_view(s):  # what a checkpoint holds: everything, or (LoRA) the trainable parameters only
        if not lora:
            return s
        params = nest({k: v for k, v in flat_values(s.params).items() if k in trainable})
        return tr.TrainState(step=s.step, params=params,
                             rest=s.rest, opt_state=s.opt_state)

    run_cfg = _run_config(cfg, model_cfg, pre_cfg)
    info = {"task": task, "labels": labels, "init_from": str(Path(init_from).absolute()), "pretrained": described,
            "saved": "trainable" if lora else "all", "trainable": sorted(trainable) if lora else "all",
            "train_file": str(cfg.train_file), "validation_file": str(cfg.validation_file)}
    is_writer = jax.process_index() == 0
    checkpoints = ckpt_lib.Checkpoints(workdir, keep=tc.keep_checkpoints)
    start_step = 0
    if checkpoints.steps():
        old = workdir / FINETUNE_INFO
        if old.is_file() and json.loads(old.read_text()).get("trainable") != info["trainable"]:
            raise ConfigError(f"{workdir} holds checkpoints of a different fine-tuning setup; use a new --workdir")
        found = checkpoints.restore_latest(saved_view(state), saved_view(state_sh), run_cfg, check=False)
        if found is not None:
            restored, _, start_step, _ = found
            if lora:
                set_params(state.params, {k: v for k, v in unnest(restored.params).items()})
                state = tr.TrainState(step=restored.step, params=state.params, rest=restored.rest,
                                      opt_state=restored.opt_state)
            else:
                state = restored
            log.info("resuming from %s at step %d", checkpoints.directory / str(start_step), start_step)
    if is_writer:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(run_cfg, indent=2) + "\n")
        (workdir / FINETUNE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (workdir / "command.txt").write_text(" ".join(sys.argv) + "\n")
        if tok_path.absolute() != (workdir / TOKENIZER).absolute():
            shutil.copyfile(tok_path, workdir / TOKENIZER)

    # 5. steps
    loss_fn = make_loss_fn(task, trainable)
    weight_key = task_data.example_weight_key(task)
    batches = task_data.train_batches(train_arrays, tc.batch_size, tc.seed, start=start_step)
    first = next(batches)
    batch_sh = tr.batch_shardings(mesh, first)
    step_fn = tr.make_train_step(graphdef, tx, state_sh, batch_sh, micro_batches=tc.micro_batches,
                                 label_smoothing=tc.label_smoothing, z_loss=tc.z_loss, lr_schedule=lr_schedule,
                                 loss_fn=loss_fn, weights_fn=make_weights_fn(task), rules=rules)
    eval_fn = tr.make_eval_step(graphdef, state_sh, batch_sh, loss_fn=make_loss_fn(task), rules=rules)

    def evaluate(state) -> dict:
        total = None
        for b in task_data.eval_batches(val_arrays, tc.batch_size, weight_key):
            sums = eval_fn(state, tr.global_batch(b, mesh))
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        m = {k: float(v) for k, v in tr._metrics(total).items()}
        m.pop("tokens", None)
        if task == "text_to_text":
            m["exact_match"] = exact_match(nnx.merge(graphdef, state.params, state.rest, copy=True), tokenizer,
                                           val_rows, cfg)
        if task == "causal_lm":
            m["perplexity"] = float(np.exp(min(m["loss"], 50.0)))
        return m

    writer = mt.MetricsWriter(workdir, enabled=is_writer)
    start_eval = evaluate(state)
    writer.write(start_step, start_eval, "eval")
    log.info("step %d: validation %s", start_step, _describe(start_eval))
    bar = tqdm(total=tc.steps, initial=start_step, disable=not (progress and is_writer), desc="finetune",
               unit="step", dynamic_ncols=True)
    batch, step, last_train, last_eval = first, start_step, {}, start_eval
    train_t0 = time.time()
    try:
        while step < tc.steps:
            state, m = step_fn(state, tr.global_batch(batch, mesh))
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                last_train = {k: float(v) for k, v in m.items()}
                last_train.pop("tokens", None)
                writer.write(step, last_train)
                bar.set_postfix(loss=f"{last_train['loss']:.3f}", acc=f"{last_train['accuracy']:.3f}")
            if step % tc.eval_every == 0 or step == tc.steps:
                last_eval = evaluate(state)
                writer.write(step, last_eval, "eval")
                bar.write(f"step {step}: validation {_describe(last_eval)}")
            if step == tc.steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                checkpoints.save(step, saved_view(state), {"first_stream": 0, "positions": [step]}, run_cfg)
            if step < tc.steps:
                batch = next(batches)
    finally:
        checkpoints.close()
        bar.close()
        writer.close()
    train_seconds = time.time() - train_t0
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
        "validation_start": start_eval, "validation": last_eval, "train": last_train,
        "chance_accuracy": chance_accuracy(task, val_arrays),
        "checkpoint_bytes": _dir_bytes(ckpt_dir / "state") if (ckpt_dir / "state").is_dir() else None,
        "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - t0, 1),
    }
    if is_writer:
        (workdir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{task}: validation {_describe(start_eval)} at step {start_step} -> {_describe(last_eval)} at step {step}"
          + (f" (chance {results['chance_accuracy']:.3f})" if results["chance_accuracy"] is not None else ""))
    print(f"results: {workdir / RESULTS}")
    return results


def _describe(m: dict) -> str:
    parts = [f"loss {m.get('loss', float('nan')):.4f}", f"accuracy {m.get('accuracy', float('nan')):.3f}"]
    if "exact_match" in m:
        parts.append(f"exact match {m['exact_match']:.3f}")
    if "perplexity" in m:
        parts.append(f"perplexity {m['perplexity']:.2f}")
    return ", ".join(parts)


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
    from llmjax.generate import generate

    hits = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [ids[: cfg.max_length - 1] + [1] for ids in tokenizer.encode_batch([r["input"] for r in chunk])]
        prompts += [prompts[0]] * (batch_size - len(prompts))  # one compiled shape for every chunk
        out = generate(model, prompts, max_new_tokens=int(cfg.target_length), method="greedy")
        hits += sum(tokenizer.decode(t).strip() == r["target"].strip() for t, r in zip(out.tokens, chunk))
    return hits / max(len(rows), 1)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _run_config(cfg, model_cfg: ModelConfig, pre_cfg: dict) -> dict:
    """The effective config: the fine-tuning config with the full model section (so the run can be rebuilt,
    exported and loaded like a training run) and the pretrained run's data section (its tokenizer)."""
    d = json.loads(cfg.to_json_best_effort())
    d["model"] = _model_dict(model_cfg)
    d["data"] = pre_cfg.get("data", {})
    return d


# ------------------------------------------------------------------------------------------------- CLI
def finetune_main(args: list[str]) -> int:
    from absl import flags

    from llmjax.cli import parse_config_flags

    def define(fv):
        flags.DEFINE_string("init_from", None, "pretrained training workdir or export directory", flag_values=fv)

    fv = parse_config_flags(["llmjax finetune", *_dashes(args)], define=define)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not fv.init_from:
        raise SystemExit("llmjax finetune: --init-from is required (a training workdir or an export directory)")
    if not fv.workdir:
        raise SystemExit("llmjax finetune: --workdir is required (the fine-tuned run is written there)")
    try:
        finetune(fv.config, fv.init_from, fv.workdir)
    except (ConfigError, task_data.TaskDataError) as e:
        raise SystemExit(f"llmjax finetune: {e}") from None
    except FileNotFoundError as e:
        raise SystemExit(f"llmjax finetune: --init-from: {e}") from None
    return 0


def _dashes(args: list[str]) -> list[str]:
    """Accept --init-from as well as absl's --init_from."""
    return [a.replace("--init-from", "--init_from", 1) if a.startswith("--init-from") else a for a in args]


def merge_lora_main(args: list[str]) -> int:
    import argparse

    import orbax.checkpoint as ocp

    from llmjax import checkpoint as ckpt

    p = argparse.ArgumentParser(prog="llmjax merge-lora", description="fold a LoRA fine-tuning run's adapters "
                                "into the base weights: W + (alpha / r) A B -> an export directory (params only)")
    p.add_argument("--base", required=True, help="the pretrained training workdir or export directory")
    p.add_argument("--adapters", required=True, help="the LoRA fine-tuning workdir (llmjax finetune --workdir)")
    p.add_argument("--out", required=True, help="export directory to write (config.json + params/)")
    ns = p.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    adapters = Path(ns.adapters)
    if not (adapters / FINETUNE_INFO).is_file():
        raise SystemExit(f"llmjax merge-lora: --adapters {adapters} is not a fine-tuning workdir (no {FINETUNE_INFO})")
    if not Path(ns.base).exists():
        raise SystemExit(f"llmjax merge-lora: --base {ns.base} does not exist")
    cfg = json.loads((adapters / "config.json").read_text())
    if not cfg["model"].get("lora_rank"):
        raise SystemExit(f"llmjax merge-lora: --adapters {adapters} was fully fine-tuned (lora.rank=0): nothing "
                         f"to merge; export it with `llmjax export --workdir {adapters} --out DIR`")
    try:
        model, cfg = load_finetuned(adapters, base=ns.base)
    except FileNotFoundError as e:
        raise SystemExit(f"llmjax merge-lora: {e}") from None
    merged = merge_lora_model(model)
    out = Path(ns.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as w:
        w.save(out / ckpt.EXPORT_PARAMS, nnx.state(merged, nnx.Param).to_pure_dict(), force=True)
    merged_cfg = {**cfg, "model": _model_dict(merged.cfg), "merged_from": {"base": str(ns.base),
                                                                            "adapters": str(adapters)}}
    (out / ckpt.EXPORT_CONFIG).write_text(json.dumps(merged_cfg, indent=2) + "\n")
    for name in (TOKENIZER, FINETUNE_INFO):
        if (adapters / name).is_file():
            shutil.copyfile(adapters / name, out / name)
    print(f"merged the rank-{model.cfg.lora_rank} adapters of {adapters} (step {cfg.get('finetuned_step')}) into "
          f"{ns.base}: wrote {out}")
    return 0
