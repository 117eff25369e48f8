"""`llmjax ...` in a fresh process with a chosen number of simulated CPU devices.

The in-process test session has 8 simulated devices (conftest). On 2 cores a tiny model's step split over 8
devices costs several times what it costs on 1 or 2 (moe_tiny's 40-step run: 77 s on 8, 25 s on 2), so the
end-to-end runs that are not about the mesh run here, on 2 devices (still a data-parallel mesh)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def run_cli(args: list[str], *, devices: int = 2, timeout: float = 900) -> str:
    """Run `llmjax ARGS...` (args without the leading "llmjax"), assert it succeeded; return its stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-m", "llmjax.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=timeout)
    assert out.returncode == 0, f"llmjax {' '.join(map(str, args))} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout
