"""Where training numbers go: WORKDIR/metrics.jsonl (one JSON object per line, with `step`), TensorBoard
event files, and loss.png; plus the peak FLOP/s used for MFU."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import storage

# Dense peak FLOP/s per chip (bf16) of common accelerators, by jax device_kind prefix.
KNOWN_PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    # NVIDIA dense bf16 (no sparsity). First matching prefix wins: longer names before their prefixes.
    "NVIDIA H200": 989e12, "NVIDIA GH200": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
}


def measured_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul on the default device: the practical peak on a CPU."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
    if configured:
        return float(configured), "train.peak_flops"
    kind = jax.devices()[0].device_kind
    for prefix, peak in KNOWN_PEAKS.items():
        if kind.startswith(prefix):
            return peak, f"{kind} datasheet"
    return measured_matmul_peak(), f"measured float32 matmul on {kind}"


def tensorboard_dir(workdir) -> str:
    """WORKDIR/tensorboard: TensorBoard's event files and the profiler's traces (a gs:// URL stays one)."""
    return str(storage.path(workdir) / "tensorboard")


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported only by the process that writes, and without PyTorch: tensorboardX
    imports torch whenever it is installed (1.1 s of every run's start here), for tensor types llmjax never
    hands it (it writes Python floats). While it loads, `import torch` fails, so it falls back to numpy."""
    if "torch" in sys.modules:  # already loaded by the user's process: nothing to save
        from tensorboardX import SummaryWriter  # heavy: see above
        return SummaryWriter
    sys.modules["torch"] = None  # an ImportError for `import torch`, for the duration of this import only
    try:
        from tensorboardX import SummaryWriter  # heavy: see above
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends metrics to metrics.jsonl and TensorBoard; only the writing process (process 0) writes.

    On a bucket (gs://) an object cannot be appended to: the rows are kept here and the whole file is rewritten
    at flush(), which the loop calls after every checkpoint save (and close() at the end), and at most every
    FLUSH_SECONDS otherwise. Rows after the newest checkpoint may be lost with the process, as their steps are:
    a resume runs them again (and drops any such rows first)."""

    FLUSH_SECONDS = 60.0

    def __init__(self, workdir, enabled: bool = True):
        self.path = storage.path(workdir) / "metrics.jsonl"
        self.remote = storage.is_remote(workdir)
        self.enabled = enabled
        self.tb = None
        self._rows: list[str] = []
        self._dirty = False
        self._flushed = time.monotonic()
        if enabled and self.remote:
            text = self.path.read_text() if self.path.exists() else ""
            self._rows = [json.dumps(row) + "\n" for row in parse_rows(text, self.path)]
        elif enabled and self.path.exists() and os.path.getsize(self.path):
            with open(self.path, "rb+") as f:  # a torn last line (killed mid-write) must not swallow the next row
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        if enabled:
            self.tb = _summary_writer_class()(tensorboard_dir(workdir))  # gs:// too (tensorboardX)

    def write(self, step: int, metrics: dict, prefix: str = "train"):
        if not self.enabled:
            return
        row = {"step": int(step), **{f"{prefix}/{k}": _py(v) for k, v in metrics.items()}}
        if self.remote:
            self._rows.append(json.dumps(row) + "\n")
            self._dirty = True
            if time.monotonic() - self._flushed > self.FLUSH_SECONDS:
                self.flush()
        else:  # one whole line per write call, flushed: a kill or a full disk can only tear the last line
            with open(self.path, "ab", buffering=0) as f:
                f.write((json.dumps(row) + "\n").encode())
        for k, v in metrics.items():
            if isinstance(_py(v), (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", _py(v), int(step))

    def text(self, step: int, tag: str, text: str):
        if self.enabled:
            self.tb.add_text(tag, text, int(step))

    def flush(self):
        """On a bucket: rewrite metrics.jsonl with every row so far (one object write, whole or not at all)."""
        if self.enabled and self.remote and self._dirty:
            self.path.write_text("".join(self._rows))
            self._dirty = False
        self._flushed = time.monotonic()
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        self.flush()
        if self.tb is not None:
            self.tb.close()


def _py(v):
    """A JSON value: non-finite floats become null (JSON has no NaN; readers skip None)."""
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
        v = np.asarray(v).item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def parse_rows(text: str, source="metrics.jsonl") -> list[dict]:
    """The rows of a metrics.jsonl text; a torn or garbage line (a kill or a full disk mid-write) is dropped
    with a warning rather than failing every later read and resume."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            logging.getLogger("llmjax").warning("%s line %d is not a metrics row (torn write?): dropped: %.80r",
                                                source, n, line)
            continue
        rows.append(row)
    return rows


def read_metrics(workdir) -> list[dict]:
    path = storage.path(workdir) / "metrics.jsonl"
    return parse_rows(path.read_bytes().decode(errors="replace"), path) if path.exists() else []


def evaluations(rows: list[dict], prefix: str = "eval") -> list[tuple[int, dict]]:
    """[(step, {metric: value})] of the evaluation rows (those with `prefix/` keys), in file order."""
    out = []
    for row in rows:
        values = {k[len(prefix) + 1:]: v for k, v in row.items() if k.startswith(prefix + "/")}
        if values:
            out.append((row["step"], {k: (math.nan if v is None else v) for k, v in values.items()}))
    return out


def plot_losses(workdir) -> Path:
    """loss.png: train and validation loss against step."""
    import matplotlib  # heavy: imported by the one function that plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    rows = read_metrics(workdir)
    # None: a non-finite loss (written as null): left out of the curve
    train = [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss") is not None]
    val = [(r["step"], r["eval/loss"]) for r in rows if r.get("eval/loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per predicted token)")
    ax.set_title(storage.path(workdir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = storage.path(workdir) / "loss.png"
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)
    return out


def save_figure(fig, path, dpi: int = 100) -> None:
    """A matplotlib figure as PNG at `path` (local or gs://), written whole."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    storage.write_atomic(path, png.getvalue())
