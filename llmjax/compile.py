"""`llmjax compile`: compile the real sharded train step ahead of time for a TPU topology on this machine
(libtpu, no TPU needed) and report per-chip memory, whether it fits the chip's HBM, and the compiler's
cost estimate turned into a step time and MFU.

    llmjax compile --config configs/llama_1b.py --topology v5p-128 [--config.mesh.fsdp=...]

`build_train_step` (the same step `llmjax train` runs, on a synthetic batch of the config's shapes) is
shared with benchmarks/throughput.py.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import importlib.util
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.experimental import topologies

from llmjax import sharding as shd
from llmjax.config import objective_config_for
from llmjax.data import pipeline
from llmjax.data.vocab import SpecialIds
from llmjax.kernels.dispatch import resolve_kernel
from llmjax.models.config import ConfigError, ModelConfig
from llmjax.models.flops import train_flops
from llmjax.objectives import make_objective
from llmjax.objectives.loss import objective_loss
from llmjax.state import init_state, init_state_abstract, learning_rate_schedule, make_optimizer
from llmjax.step import make_train_step

# The release jax[tpu]==0.10.2 asks for. The one home of this pin: the tests import it, and the `tpu` extra of
# pyproject.toml, which cannot import it, is checked against it (tests/test_compile.py).
LIBTPU = "libtpu==0.0.42.1"
LIBTPU_DIR_ENV = "LLMJAX_LIBTPU_DIR"
GIB = 1024 ** 3

# Per chip: HBM bytes and dense bf16 peak FLOP/s (Google Cloud TPU datasheets), by generation.
CHIPS = {
    "v4": dict(hbm=32 * GIB, peak=275e12, jax_name="v4", cores_per_chip=1),
    "v5e": dict(hbm=16 * GIB, peak=197e12, jax_name="v5e", cores_per_chip=1),
    "v5p": dict(hbm=95 * GIB, peak=459e12, jax_name="v5p", cores_per_chip=1),
    "v6e": dict(hbm=32 * GIB, peak=918e12, jax_name="v6e", cores_per_chip=1),
}


def default_libtpu_dir() -> Path:
    """The directory of its own that holds libtpu (`pip install --target`), keyed by its version: outside every
    environment (libtpu makes JAX look for a TPU at start-up), put on sys.path by `llmjax compile` alone."""
    version = LIBTPU.split("==")[1]
    return Path(os.environ.get(LIBTPU_DIR_ENV, Path.home() / ".cache" / "llmjax" / f"libtpu-{version}"))


# --------------------------------------------------------------------------------------- the real step
def synthetic_batch_spec(cfg, model_cfg) -> dict:
    """{key: jax.ShapeDtypeStruct} of one global batch of `cfg`'s objective and shapes, exactly the keys,
    shapes and dtypes the data pipeline produces (built from the objective, no tokenizer needed)."""
    ids = SpecialIds(int(cfg.data.vocab_size), int(cfg.data.get("num_sentinels", 100)))
    objective = make_objective(cfg.objective, ids, model_cfg.family, **objective_config_for(cfg))
    return pipeline.batch_spec(objective, int(cfg.train.batch_size))


def random_batch(spec: dict, vocab_size: int, seed: int = 0) -> dict:
    """Numpy arrays for `spec`: random token ids, all-ones weights, one full-length document per row."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in spec.items():
        shape, dt = s.shape, np.dtype(s.dtype)
        if "segment_ids" in k:
            v = np.ones(shape, dt)
        elif "positions" in k:
            v = np.broadcast_to(np.arange(shape[-1], dtype=dt), shape).copy()
        elif "weights" in k:
            v = np.ones(shape, dt)
        elif dt == np.bool_:
            v = np.zeros(shape, dt)
        elif "labels" in k or "token_type" in k:
            v = rng.integers(0, 2, shape).astype(dt)
        elif np.issubdtype(dt, np.integer):
            v = rng.integers(7, vocab_size, shape).astype(dt)
        else:
            v = np.ones(shape, dt)
        out[k] = v
    return out


@dataclasses.dataclass
class StepParts:
    """What it takes to run or lower the train step of a config on a mesh."""
    model_cfg: object
    mesh: object
    step: object  # jitted (state, batch) -> (state, metrics), state donated
    abstract_state: object  # TrainState of ShapeDtypeStructs with shardings
    state_shardings: object
    graphdef: object
    tx: object
    batch_spec: dict  # {key: ShapeDtypeStruct with sharding}
    rules: dict

    def init_state(self, seed: int = 0):
        _, state, _ = init_state(self.model_cfg, self.tx, self.mesh, self.rules, seed)
        return state


def build_train_step(cfg, devices=None, model_cfg=None) -> StepParts:
    """The sharded train step of `cfg` (llmjax.train.make_train_step) on `devices` (default: all local),
    with the abstract sharded state and batch it compiles for."""
    model_cfg = model_cfg or ModelConfig.from_dict(cfg.model)
    mesh = shd.make_mesh(cfg.mesh, devices)
    rules = shd.rules_dict(cfg.sharding.rules)
    shd.validate_layout(model_cfg, mesh, int(cfg.train.batch_size), int(cfg.train.micro_batches),
                        int(cfg.train.seq_length))
    tx = make_optimizer(cfg.optim, int(cfg.train.steps))
    lr = learning_rate_schedule(cfg.optim, int(cfg.train.steps))
    graphdef, abstract, state_sh = init_state_abstract(model_cfg, tx, mesh, rules, int(cfg.train.seed))
    spec = synthetic_batch_spec(cfg, model_cfg)
    batch_sh = {k: shd.batch_sharding(mesh, len(s.shape)) for k, s in spec.items()}
    batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sh[k]) for k, s in spec.items()}
    loss_fn, weights_fn = objective_loss(cfg.objective)
    step = make_train_step(graphdef, tx, state_sh, batch_sh, micro_batches=int(cfg.train.micro_batches),
                           label_smoothing=cfg.train.label_smoothing, z_loss=cfg.train.z_loss,
                           lr_schedule=lr, loss_fn=loss_fn, weights_fn=weights_fn, rules=rules)
    return StepParts(model_cfg, mesh, step, abstract, state_sh, graphdef, tx, batch, rules)


def step_flops(cfg, model_cfg, batch_spec: dict) -> float:
    """Model FLOPs of one train step (llmjax.models.flops), from the batch's row lengths."""
    lengths = {k: s.shape[1] for k, s in batch_spec.items() if len(s.shape) == 2}
    enc = lengths.get("encoder_inputs", lengths.get("inputs"))
    return int(cfg.train.batch_size) * train_flops(model_cfg, enc, lengths.get("decoder_inputs"))


# ------------------------------------------------------------------------------------------ topologies
@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # v4 | v5e | v5p | v6e
    shape: tuple[int, ...]  # chips along each ICI axis

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def jax_name(self) -> str:  # what jax.experimental.topologies.get_topology_desc expects
        return f"{CHIPS[self.generation]['jax_name']}:{'x'.join(map(str, self.shape))}"

    def __str__(self):
        return f"{self.generation} {'x'.join(map(str, self.shape))} ({self.chips} chips)"


# Cloud TPU slice names count TensorCores for v4 and v5p (2 per chip), chips for v5e and v6e.
_CORES_IN_NAME = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def _default_shape(generation: str, chips: int) -> tuple[int, ...]:
    """The usual slice shape for a chip count: a 3-D torus for v4/v5p, a 2-D grid for v5e/v6e."""
    if chips & (chips - 1):
        raise ValueError(f"{chips} chips: not a power of two; give the shape instead, e.g. {generation}:2x2x4")
    log = chips.bit_length() - 1
    dims = 3 if generation in ("v4", "v5p") else 2
    shape = [1] * dims
    for i in range(log):  # double the axes in turn, the first ones first
        shape[i % dims] *= 2
    return tuple(sorted(d for d in shape if d > 1)) + (1,) * shape.count(1)  # 2x2x4, 4x4x4, 2x2x1, 4x4


def parse_topology(text: str) -> Topology:
    """'v5p-128' (Cloud TPU slice name), 'v5e-4', 'v5e:2x2' or 'v5p:2x2x4' -> Topology."""
    t = text.strip().lower().replace("v5litepod", "v5e").replace("v5lite", "v5e")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)[:\-]((\d+x)+\d+)", t)
    if m:
        return Topology(m.group(1), tuple(int(x) for x in m.group(2).split("x")))
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", t)
    if m:
        gen, n = m.group(1), int(m.group(2))
        per = _CORES_IN_NAME[gen]
        if n % per:
            raise ValueError(f"topology {text!r}: {gen} slice names count TensorCores ({per} per chip), so the "
                             f"number must be a multiple of {per}")
        return Topology(gen, _default_shape(gen, n // per))
    raise ValueError(f"topology {text!r}: expected a Cloud TPU slice name such as v5p-128, v5e-16, v4-32, v6e-8, "
                     f"or generation:shape such as v5e:2x2, v5p:4x4x4")


# ---------------------------------------------------------------------------------------- libtpu access
def libtpu_available() -> bool:

    return importlib.util.find_spec("libtpu") is not None


def _has_libtpu(directory: Path) -> bool:
    return (directory / "libtpu" / "__init__.py").is_file()


def use_libtpu() -> bool:
    """Make libtpu importable (JAX imports it to find the TPU compiler): from this environment if it has it,
    else from default_libtpu_dir(). False when neither has it."""
    if libtpu_available():
        return True
    directory = default_libtpu_dir()
    if not _has_libtpu(directory):
        return False
    sys.path.append(str(directory))  # last: it holds libtpu alone and shadows nothing of this environment
    return True


def _pip_install_libtpu(target: Path) -> list[str]:
    # --upgrade: replace what an earlier, killed install left in `target` (without it pip skips what is there);
    # --no-deps: libtpu needs nothing else, and --target would otherwise install again what it needed.
    return ["pip", "install", "--no-deps", "--upgrade", "--target", str(target), LIBTPU]


def _partial(directory: Path) -> Path:
    return directory.with_name(directory.name + ".partial")


def install_libtpu(directory: Path | None = None) -> Path:
    """Install libtpu into `directory` (default_libtpu_dir()) unless it is there, and return the directory.
    pip fills a sibling DIR.partial that one rename then makes DIR, so DIR exists only complete however the
    install ends; a file lock makes concurrent callers (test workers) wait for one install, not race."""

    directory = Path(directory or default_libtpu_dir())
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not _has_libtpu(directory):
            shutil.rmtree(_partial(directory), ignore_errors=True)  # a killed install's leftovers
            subprocess.run([sys.executable, "-m", *_pip_install_libtpu(_partial(directory))], check=True)
            os.rename(_partial(directory), directory)
    return directory


def how_to_get_libtpu() -> str:

    directory = default_libtpu_dir()
    partial = _partial(directory)
    install = f"{shlex.join(_pip_install_libtpu(partial))} && mv {shlex.join([str(partial), str(directory)])}"
    return (
        "llmjax compile needs libtpu, the TPU compiler (~0.7 GB; no TPU is needed: it compiles on this CPU).\n"
        "Install it into a directory of its own, where llmjax compile finds it (and keep it out of training\n"
        "environments: libtpu makes JAX look for a TPU at start-up):\n"
        f"  {install}\n"
        f"(To keep it elsewhere, set {LIBTPU_DIR_ENV}=DIR: this command then installs into DIR.)")


# --------------------------------------------------------------------------------------------- report
HBM_BANDWIDTH = {"v4": 1228e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}  # bytes/s per chip (datasheets)
ICI_BANDWIDTH = {"v4": 300e9, "v5e": 200e9, "v5p": 600e9, "v6e": 448e9}  # bytes/s per chip, all links (datasheets)
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2}


def _shape_bytes(text: str) -> int:
    size = 0
    for dt, dims in _ARRAY.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        size += n * _DTYPE_BYTES.get(dt, max(int(re.sub(r"\D", "", dt) or 8) // 8, 1))
    return size


_GROUPS = re.compile(r"(?:replica_groups|source_target_pairs)=(\{[\d,{}]*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)")


def replica_groups(text: str) -> list[list[int]] | None:
    """The device groups of an HLO collective's `replica_groups` ({{0,1},{2,3}}, or the iota form
    [2,4]<=[4,2]T(1,0)) or a permute's `source_target_pairs`; [] for one group of all devices, None if absent."""
    m = _GROUPS.search(text)
    if m is None:
        return None
    g = m.group(1)
    if g.startswith("{"):
        return [[int(x) for x in grp.split(",") if x] for grp in re.findall(r"\{([\d,]*)\}", g[1:-1])]
    shape, dims, perm = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", g).groups()
    ids = np.arange(math.prod(int(d) for d in dims.split(","))).reshape([int(d) for d in dims.split(",")])
    if perm:
        ids = ids.transpose([int(p) for p in perm.split(",")])
    return ids.reshape([int(d) for d in shape.split(",")]).tolist()


def collectives(hlo_text: str) -> list[tuple[str, int, list[list[int]] | None]]:
    """(kind, bytes one device moves, device groups) of each collective of a compiled HLO module: the result size
    of an all-gather / reduce-scatter / all-to-all / permute, twice that of an all-reduce (reduce + broadcast)."""
    out = []
    hlo_text = _INDEX_COMMENT.sub("", hlo_text)  # long tuples carry /*index=5*/ comments
    for m in _COLLECTIVE.finditer(hlo_text):
        line_end = hlo_text.find("\n", m.end())
        rest = hlo_text[m.end(): line_end if line_end >= 0 else len(hlo_text)]
        size = _shape_bytes(m.group(1)) * (2 if m.group(2) == "all-reduce" else 1)
        out.append((m.group(2), size, replica_groups(rest)))
    return out


def collective_bytes(hlo_text: str) -> int:
    """Bytes one device moves in the collectives of a compiled HLO module (see `collectives`)."""
    return sum(size for _, size, _ in collectives(hlo_text))


_INDEX_COMMENT = re.compile(r"/\*index=\d+\*/")
# A TPU program of several slices reaches the other slices through the data-centre network's runtime (Megascale):
# each transfer is a host `send` naming its collective.
_DCN_SEND = re.compile(r"=\s*\((.*?)\)\s+send\(.*_xla_megascale_transfer_type=\"(\w+)\"")


def cross_slice_collectives(hlo_text: str, slice_of: Sequence[int]) -> list[tuple[str, int]]:
    """(kind, bytes one device sends) of the collectives that cross slices: the data-centre-network transfers of
    a multi-slice TPU program, and collectives whose device groups span slices (`slice_of[i]`: the slice of the
    program's device i, the mesh's devices in order)."""
    out = []
    for m in _DCN_SEND.finditer(_INDEX_COMMENT.sub("", hlo_text)):
        data = _ARRAY.search(m.group(1))  # the tuple is (data, u32[] context, token[])
        out.append((m.group(2).lower().replace("_", "-"), _shape_bytes(data.group(0)) if data else 0))
    for kind, size, groups in collectives(hlo_text):
        if groups == []:  # one group of every device
            groups = [list(range(len(slice_of)))]
        if groups is None:
            continue
        if any(len({slice_of[d] for d in grp}) > 1 for grp in groups):
            out.append((kind, size))
    return out


def _itemsize(dtype) -> int:
    return int(getattr(dtype, "itemsize", 0) or 8)  # PRNG key arrays: 2 x uint32


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += int(np.prod(shape)) * _itemsize(leaf.dtype)
    return total


def _total_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * _itemsize(x.dtype) for x in jax.tree.leaves(tree))


def _costs(compiled) -> tuple[float, float, float]:
    """(FLOPs, bytes accessed, collective bytes) per device of a compiled program, as the compiler counts them."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)), float(collective_bytes(
        compiled.as_text()))


def _program_costs(cfg, model_cfg, devices) -> np.ndarray:
    """[FLOPs, bytes accessed, collective bytes] per device of cfg's train step for `model_cfg`."""
    parts = build_train_step(cfg, devices, model_cfg=model_cfg)
    with jax.set_mesh(parts.mesh):
        compiled = parts.step.lower(parts.abstract_state, parts.batch_spec).compile()
    return np.array(_costs(compiled))


def _unrolled_costs(cfg, model_cfg, devices) -> tuple[float, float, float]:
    """The per-device costs of a scanned model's step as if unrolled: XLA's cost analysis counts a loop's body
    once, so they come from unrolled twins of one and two scan steps per stack, extrapolated linearly in depth
    (every step of a stack costs the same)."""
    p = model_cfg.scan_period
    encdec = model_cfg.family == "encoder_decoder"

    def twin(enc: int, dec: int) -> np.ndarray:
        return _program_costs(cfg, model_cfg.replace(scan_layers=False, num_layers=enc,
                                                     num_decoder_layers=dec if encdec else None), devices)

    base = twin(p, p)
    total = base + (model_cfg.num_layers // p - 1) * (twin(2 * p, p) - base)
    if encdec:
        total += (model_cfg.decoder_layers // p - 1) * (twin(p, 2 * p) - base)
    return tuple(float(x) for x in total)


def compile_for_topology(cfg, topology: Topology, *, kernel: str | None = None, num_slices: int = 1) -> dict:
    """Compile `cfg`'s train step for `num_slices` slices of `topology` (joined by the data-centre network; the
    mesh's dcn_* axes say which axes span them) and return the report (a JSON-able dict)."""

    model_cfg = ModelConfig.from_dict(cfg.model)
    model_cfg = model_cfg.replace(attention_kernel=resolve_kernel(kernel or model_cfg.attention_kernel, "tpu"))
    slices = math.prod(shd.dcn_shape(cfg.mesh).values())
    if slices != num_slices:
        raise ConfigError(f"--num-slices {num_slices}: the mesh's dcn_* axes multiply to {slices} slices; set them "
                          f"so they multiply to {num_slices} (e.g. --config.mesh.dcn_data={num_slices})")
    extra = {"num_slices": num_slices} if num_slices > 1 else {}
    devices = topologies.get_topology_desc(topology.jax_name, "tpu", **extra).devices
    chips = topology.chips * num_slices
    per_chip = len(devices) // chips  # v4 topologies expose each TensorCore as a device
    chip = CHIPS[topology.generation]
    parts = build_train_step(cfg, devices, model_cfg=model_cfg)
    state = parts.abstract_state
    params_b, opt_b = _shard_bytes(state.params), _shard_bytes(state.opt_state)
    other_b = _shard_bytes(state.rest) + _shard_bytes(state.step)
    t0 = time.perf_counter()
    # Under the mesh context the splash kernel runs per shard (shard_map) and activations stay batch-sharded.
    with jax.set_mesh(parts.mesh):
        lowered = parts.step.lower(parts.abstract_state, parts.batch_spec)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that exceed HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, oom = None, str(e)
    compile_s = time.perf_counter() - t0
    if compiled is not None:
        mem = compiled.memory_analysis()
        arg, out, alias, temp = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                                 mem.temp_size_in_bytes)
        code = getattr(mem, "generated_code_size_in_bytes", 0)
        # The TPU compiler may book small programs' temporaries only in its peak (temp_size can read 0).
        temp = max(temp, int(getattr(mem, "peak_memory_in_bytes", 0) or 0) - (arg + out - alias))
        flops_dev, bytes_dev, coll_dev = _costs(compiled)
        hlo = compiled.as_text()
        cost_s = 0.0
        if model_cfg.scan_layers:  # the compiler's counts see a loop's body once: extrapolate from unrolled twins
            t1 = time.perf_counter()
            flops_dev, bytes_dev, coll_dev = _unrolled_costs(cfg, model_cfg, devices)
            cost_s = time.perf_counter() - t1
    else:  # what the compiler's message says it needed; the state is known exactly
        arg = out = alias = params_b + opt_b + other_b
        temp, code = _temporaries_from_oom(oom, hbm=chip["hbm"] / per_chip, state=arg), 0
        flops_dev = bytes_dev = coll_dev = cost_s = 0.0
        hlo = ""
    peak_dev = arg + out - alias + temp + code
    peak_chip = peak_dev * per_chip
    peak_flops = chip["peak"]
    model_flops = step_flops(cfg, model_cfg, parts.batch_spec)
    # Time of one chip's program from the compiler's counts: matmul FLOPs at the bf16 peak (at least the
    # model FLOPs: the cost analysis does not see inside Pallas kernels), HBM traffic at the HBM bandwidth,
    # collectives (summed from the compiled HLO) at the ICI bandwidth. Their sum assumes no overlap (a
    # conservative estimate); their maximum assumes perfect overlap (an optimistic bound).
    t_compute = max(flops_dev * per_chip, model_flops / chips) / peak_flops
    t_memory = bytes_dev * per_chip / HBM_BANDWIDTH[topology.generation]
    # Between slices (over the data-centre network, not ICI): the collectives whose groups span slices.
    cross = cross_slice_collectives(hlo, [d.slice_index for d in parts.mesh.devices.flat]) if num_slices > 1 else []
    t_comm = coll_dev * per_chip / ICI_BANDWIDTH[topology.generation]
    step_s = t_compute + t_memory + t_comm
    best_s = max(t_compute, t_memory, t_comm)
    report = {
        "config": {"family": model_cfg.family, "parameters": sum(
            math.prod(x.shape) for x in jax.tree.leaves(state.params)), "dtype": model_cfg.dtype,
            "remat": model_cfg.remat, "attention_kernel": _kernel_note(model_cfg),
            "batch_size": int(cfg.train.batch_size), "micro_batches": int(cfg.train.micro_batches),
            "lengths": {k: list(s.shape) for k, s in parts.batch_spec.items() if len(s.shape) == 2 and (
                k.endswith("inputs"))}},
        "topology": {"name": topology.jax_name, "generation": topology.generation, "chips": chips,
                     "slices": num_slices, "devices": len(devices), "hbm_per_chip_bytes": chip["hbm"],
                     "peak_bf16_flops_per_chip": peak_flops},
        "mesh": {k: int(v) for k, v in parts.mesh.shape.items()},
        "memory_per_chip_bytes": {
            "parameters": params_b * per_chip, "optimizer_state": opt_b * per_chip, "other_state": other_b * per_chip,
            "arguments": arg * per_chip, "outputs": out * per_chip, "aliased": alias * per_chip,
            "temporaries": temp * per_chip, "generated_code": code * per_chip, "peak": peak_chip,
        },
        "state_total_bytes": {"parameters": _total_bytes(state.params), "optimizer_state": _total_bytes(state.opt_state)},
        "fits": peak_chip <= chip["hbm"],
        "cost_per_chip": {"flops": flops_dev * per_chip, "bytes_accessed": bytes_dev * per_chip},
        "model_flops_per_step": model_flops,
        "collective_bytes_per_chip": coll_dev * per_chip,
        "cross_slice": {"bytes_per_chip": sum(b for _, b in cross) * per_chip,
                        "collectives": dict(sorted(collections.Counter(kind for kind, _ in cross).items()))},
        "time_s": {"compute": t_compute, "hbm": t_memory, "ici": t_comm},
        "estimated_step_s": step_s,
        "bound": max(("compute", t_compute), ("memory", t_memory), ("communication", t_comm), key=lambda x: x[1])[0],
        "estimated_mfu": model_flops / (step_s * peak_flops * chips) if flops_dev else None,
        "mfu_upper_bound": model_flops / (best_s * peak_flops * chips) if flops_dev else None,
        "tokens_per_step": int(cfg.train.batch_size) * sum(
            s.shape[1] for k, s in parts.batch_spec.items() if k in ("inputs", "encoder_inputs", "decoder_inputs")),
        "compile_s": compile_s,
        "cost_compile_s": cost_s,  # scanned stacks: compiling the unrolled twins the costs come from
        "compiler_error": None if compiled is not None else oom.strip().splitlines()[-1][:500],
    }
    report["suggestions"] = [] if report["fits"] else suggestions(report, cfg)
    return report


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "_KMGT".index(unit or "_"))


def _temporaries_from_oom(message: str, *, hbm: float, state: int) -> int:
    """Temporary bytes per device from the TPU compiler's out-of-memory message."""
    m = re.search(r"HLO temporaries \(" + _SIZE + r"\)", message)
    if m:
        return _bytes(m.group(1), m.group(2))
    m = re.search(r"[Uu]sed " + _SIZE + r" of " + _SIZE, message)
    if m:
        return max(_bytes(m.group(1), m.group(2)) - state, 0)
    m = re.search(r"[Ee]xceeded \w+ capacity by " + _SIZE, message)
    if m:
        return int(hbm + _bytes(m.group(1), m.group(2)) - state)
    return int(hbm)  # at least the whole HBM: it did not fit


def _kernel_note(model_cfg) -> str:
    """The attention kernel, and when splash hands some attentions to the reference kernel, which and why."""
    k = model_cfg.attention_kernel
    if k != "splash":
        return k
    why = []
    if model_cfg.attention_dropout_rate > 0:
        why.append("attention dropout")
    if model_cfg.position == "relative":
        why.append("relative position bias")
    if model_cfg.family == "encoder_decoder":
        why.append("cross-attention")
    return k + (f" (reference where there is {', '.join(why)})" if why else "")


def suggestions(report: dict, cfg) -> list[str]:
    """What would make a config that does not fit fit, most effective first, with the memory it would need."""
    mem, topo, mesh = report["memory_per_chip_bytes"], report["topology"], report["mesh"]
    hbm, chips = topo["hbm_per_chip_bytes"], topo["chips"]
    state_chip = mem["parameters"] + mem["optimizer_state"]
    state_total = report["state_total_bytes"]["parameters"] + report["state_total_bytes"]["optimizer_state"]
    rest = mem["peak"] - state_chip  # activations, temporaries, gradients, code
    out = []
    if state_total / chips > 0.9 * hbm:
        need = 2 ** math.ceil(math.log2(state_total / (0.6 * hbm)))
        out.append(f"the parameters and optimizer state alone ({state_total / GIB:.1f} GiB) need more than "
                   f"{chips} chips of {hbm / GIB:.0f} GiB: use a larger slice (about {need} chips) or "
                   f"--config.optim.optimizer=adafactor (factored second moments)")
    sharded_over = mesh.get("fsdp", 1) * mesh.get("tensor", 1) * mesh.get("expert", 1)
    if sharded_over < chips:
        full = state_total / chips
        out.append(f"shard the state over all {chips} chips: --config.mesh.data=1 --config.mesh.fsdp=-1 "
                   f"(parameters + optimizer state {state_chip / GIB:.2f} -> {full / GIB:.2f} GiB per chip, "
                   f"peak about {(rest + full) / GIB:.1f} GiB)")
    remat = report["config"]["remat"]
    if remat != "full":
        nxt = "save_dots" if remat == "none" else "full"
        out.append(f"recompute activations in the backward pass: --config.model.remat={nxt}"
                   + (" (or full)" if nxt == "save_dots" else "") + f" (temporaries now {mem['temporaries'] / GIB:.1f} GiB)")
    micro = report["config"]["micro_batches"]
    out.append(f"accumulate gradients over more, smaller micro-batches: --config.train.micro_batches={micro * 4} "
               f"(activation memory about {1 / 4:.2f}x)")
    if report["config"]["dtype"] == "float32":
        out.append("compute in bfloat16 (float32 master weights): --config.model.dtype=bfloat16")
    return out


def format_report(r: dict) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB" if b >= GIB / 4 else f"{b / 2**20:8.1f} MiB"
    m, t, c = r["memory_per_chip_bytes"], r["topology"], r["config"]
    lengths = " + ".join(f"{v[1]} ({k})" for k, v in c["lengths"].items())
    lines = [
        f"{c['family']} model, {c['parameters'] / 1e9:.3f}B parameters, {c['dtype']} compute, remat {c['remat']}, "
        f"attention {c['attention_kernel']}; batch {c['batch_size']} x {lengths} tokens"
        + (f", {c['micro_batches']} micro-batches" if c["micro_batches"] > 1 else ""),
        f"topology {t['name']}" + (f" x {t['slices']} slices" if t.get("slices", 1) > 1 else "")
        + f": {t['chips']} chips ({t['devices']} devices); mesh "
        + " x ".join(f"{k}={v}" for k, v in r["mesh"].items()) + f"; compiled in {r['compile_s']:.1f} s"
        + (f" (scanned layers; their costs from unrolled twins of 1 and 2 steps, {r['cost_compile_s']:.1f} s)"
           if r.get("cost_compile_s") else ""),
        "memory per chip:",
        f"  parameters          {g(m['parameters'])}",
        f"  optimizer state     {g(m['optimizer_state'])}",
        f"  temporaries         {g(m['temporaries'])}   (activations, gradients, workspace)",
        f"  arguments / outputs {g(m['arguments'])} / {g(m['outputs'])} ({g(m['aliased']).strip()} donated)",
        f"  peak                {g(m['peak'])}   of {t['hbm_per_chip_bytes'] / GIB:.0f} GiB HBM: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
    ]
    if r["compiler_error"]:
        lines.append(f"the TPU compiler refused it: {r['compiler_error']}")
    else:
        lines += [
            f"compiler cost per chip: {r['cost_per_chip']['flops']:.3g} FLOPs, "
            f"{r['cost_per_chip']['bytes_accessed']:.3g} bytes accessed per step",
            f"collectives per chip: {r['collective_bytes_per_chip']:.3g} bytes per step"
            + (f", of which {r['cross_slice']['bytes_per_chip']:.3g} cross slices over the data-centre network ("
               + ", ".join(f"{n} {k}" for k, n in r["cross_slice"]["collectives"].items()) + ")"
               if t.get("slices", 1) > 1 else ""),
            f"estimated step time {r['estimated_step_s'] * 1e3:.1f} ms = compute {r['time_s']['compute'] * 1e3:.1f} "
            f"(at {t['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per chip) + HBM {r['time_s']['hbm'] * 1e3:.1f} "
            f"+ ICI {r['time_s']['ici'] * 1e3:.1f} ms, no overlap assumed ({r['bound']} dominates)",
            f"  -> {r['tokens_per_step'] / max(r['estimated_step_s'], 1e-12):,.0f} tokens/s, estimated MFU "
            f"{r['estimated_mfu']:.2f} (with perfect overlap at most {r['mfu_upper_bound']:.2f})",
        ]
    if r["suggestions"]:
        lines.append("to make it fit:")
        lines += [f"  - {s}" for s in r["suggestions"]]
    return "\n".join(lines)
