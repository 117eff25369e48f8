"""The one seam between the model and the kernels (llmjax.kernels.dispatch): a GPT training step on one CPU device
makes exactly its kernel calls through it, none with LLMJAX_CPU_KERNELS=0 (and the same loss), and the model and
loss code import nothing else from llmjax.kernels."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A GPT step (loss and gradients) on one CPU device: head dim 64 and T = 64, so q, k and v come from one matmul and
# the attention kernel reads them in place; prints the kernel custom calls of its HLO, whether XLA computes an erf
# (the MLP's exact GELU, which the matmul kernel applies inside its calls), and the loss.
STEP = """
import collections, json, re
import jax.numpy as jnp, numpy as np
from flax import nnx
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import build_model
from llmjax.objectives import losses

cfg = ModelConfig(family="decoder", vocab_size=97, d_model=128, num_layers=2, num_heads=2, mlp_dim=256,
                  max_length=64, activation="gelu", position="learned")
model = build_model(cfg, 0)
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 65)))

def loss_fn(model):
    sums = losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    return sums.loss / sums.weight

step = nnx.jit(nnx.value_and_grad(loss_fn))
hlo = step.lower(model).as_text()
calls = collections.Counter(re.findall(r"@(llmjax_\\w+)\\(", hlo))
print(json.dumps({"calls": calls, "erf": "erf" in hlo, "loss": float(step(model)[0])}))
"""


def gpt_step(kernels: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               LLMJAX_CPU_KERNELS=kernels)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gpt_step_calls_the_kernels_through_the_seam_and_none_when_they_are_off():
    on, off = gpt_step("1"), gpt_step("0")
    # 2 layers x (q|k|v as one matmul, o, the MLP's two) + the logits, each forward + 2 backward calls; attention
    # from the packed q|k|v per layer, forward and backward; the loss's softmax statistics, forward and backward.
    assert on["calls"] == {"llmjax_matmul": 27, "llmjax_attention_fwd_packed": 2, "llmjax_attention_bwd_packed": 2,
                           "llmjax_softmax_stats": 1, "llmjax_softmax_stats_bwd": 1}
    assert not on["erf"]  # the MLP is one kernel call with the GELU inside, not two matmuls around XLA's GELU
    assert off["calls"] == {} and off["erf"]
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)


def kernel_imports(path: pathlib.Path) -> list[str]:
    """The llmjax.kernels modules a source file imports, at any depth (imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[:2] == ["llmjax", "kernels"]]
        elif isinstance(node, ast.ImportFrom) and "kernels" in (node.module or "").split("."):
            if node.module.split(".") == ["llmjax", "kernels"]:
                found += [f"llmjax.kernels.{a.name}" for a in node.names]
            else:
                found.append(node.module)
    return found


def test_model_and_loss_code_reach_the_kernels_only_through_the_seam():
    files = sorted((ROOT / "llmjax" / "models").glob("*.py")) + sorted((ROOT / "llmjax" / "objectives").glob("*.py"))
    imports = {f.relative_to(ROOT).as_posix(): kernel_imports(f) for f in files}
    assert {f: i for f, i in imports.items() if set(i) - {"llmjax.kernels.dispatch"}} == {}
    users = {f for f, i in imports.items() if i}
    assert {"llmjax/models/layers.py", "llmjax/models/attention.py", "llmjax/objectives/losses.py"} <= users
