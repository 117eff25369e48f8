"""Building and loading the C++ kernels of llmjax.kernels, and where they may run (`platform`, `one_device`,
`per_shard`).

A kernel's source (`name.cc`, plus the headers beside it) is compiled on first use with the system's C++
compiler (`c++`, or $CXX) into ~/.cache/llmjax/kernels (or $LLMJAX_KERNEL_CACHE). The file name carries a hash
of the sources, the flags, the compiler, the CPU model and flags and the jaxlib version, so a cache shared by
different hosts never hands one a library built for an instruction set it lacks, and concurrent builds never
see a partial file. LLMJAX_CPU_KERNELS=0 turns every CPU kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib
from jax.sharding import PartitionSpec as P

from llmjax import sharding as shd

HERE = Path(__file__).parent


def enabled() -> bool:
    """False when the user turned the CPU kernels off (LLMJAX_CPU_KERNELS=0)."""
    return os.environ.get("LLMJAX_CPU_KERNELS", "1") != "0"


def cpu_flags() -> tuple[str, str]:
    """(model name, flags) of this CPU from /proc/cpuinfo; empty strings where it is unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", ""
    field = lambda name: next((line.split(":", 1)[1].strip() for line in text.splitlines()
                               if line.startswith(name)), "")
    return field("model name"), field("flags")


def cache_dir() -> Path:
    return Path(os.environ.get("LLMJAX_KERNEL_CACHE", Path.home() / ".cache" / "llmjax" / "kernels"))


def build(name: str, flags: tuple[str, ...]) -> Path:
    """Compile HERE/<name>.cc (once per sources, flags, compiler and CPU) and return the shared library."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")

    source = HERE / f"{name}.cc"
    sources = [source.read_bytes()] + [h.read_bytes() for h in sorted(HERE.glob("*.h"))]
    key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in (
        *sources, " ".join(flags), compiler, *cpu_flags(), jax.ffi.include_dir(), jaxlib.__version__))).hexdigest()[:16]
    out = cache_dir() / f"{name}_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # concurrent builds never see a partial file
            part = Path(tmp) / out.name
            r = subprocess.run([compiler, *flags, "-I", str(HERE), "-I", jax.ffi.include_dir(), str(source), "-o",
                                str(part)], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{compiler} failed to build {source.name}:\n{r.stderr[-2000:]}")
            os.replace(part, out)
    return out


def register(name: str, flags: tuple[str, ...], targets: dict[str, str]):
    """Build (`build`) and load HERE/<name>.cc and register its XLA FFI handlers for the CPU, {target name: exported
    handler symbol}; returns the loaded library. Raises OSError, RuntimeError (a failed build) or AttributeError (a
    missing symbol): each kernel's `available()` turns those into a logged fallback."""

    lib = ctypes.cdll.LoadLibrary(str(build(name, flags)))
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


def require(available: bool, kernel: str) -> None:
    """Raise if a kernel called directly (not through the model code, which checks `usable` first) cannot run."""
    if not available:
        raise RuntimeError(f"the llmjax CPU {kernel} kernel is unavailable here (see the warning logged when it "
                           "was first asked for); the model code falls back to XLA by itself")


def platform() -> str:
    """The platform being compiled for: the mesh context's devices (e.g. a TPU topology compiled for on a CPU
    host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def one_device() -> bool:
    """Whether the computation being traced runs on a single device: a mesh context (jax.set_mesh) of one device,
    or no mesh context and a single device. A custom call is not partitioned by XLA, so a kernel that is not run
    per shard (attention runs in a shard_map) may only be used then."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.size == 1 if not mesh.empty else jax.device_count() == 1


def per_shard(local, q, k, v, *rows):
    """`local(q, k, v, *rows)` for kernels XLA cannot partition (Mosaic, FFI custom calls): under a mesh context
    (jax.set_mesh) in a shard_map over the batch axes and, when it divides the heads, the tensor axis; q/k/v
    [B, T, N|K, H], each of `rows` [B, T]."""

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, *rows)
    batch_axes = shd.batch_axes(mesh)
    b_spec = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    t_size = mesh.shape.get("tensor", 1)
    h_spec = "tensor" if t_size > 1 and q.shape[2] % t_size == 0 and k.shape[2] % t_size == 0 else None
    qkv_spec, row_spec = P(b_spec, None, h_spec, None), P(b_spec, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (row_spec,) * len(rows), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, *rows)
