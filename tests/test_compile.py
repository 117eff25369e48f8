"""`llmjax compile`: the real train step compiled for a TPU topology on this CPU (libtpu in its own directory),
per-chip memory, the fit verdict with its suggestions, the cost estimate; and the TPU attention path."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.libtpu_dir import REPO, libtpu_path
from llmjax import compile as comp
from llmjax.kernels.dispatch import resolve_kernel
from llmjax.kernels.splash import splash_attention, splash_supported
from llmjax.models.attention import AttentionMask, attend


_COMPILED = {}  # args -> (process, report): one compile serves every test of this worker that asks for it
# The TPU compiler at its lowest optimization effort compiles these steps 2-6x faster (gpt_tiny 9.9 s -> 5.1 s,
# the 1.1B model that fits 30 s -> 5 s). What these tests check does not depend on it: that the step compiles,
# the memory report, the parameter and optimizer-state bytes per chip, whether the state fits the chip. The
# README's TPU table is compiled at the default effort.
COMPILE_ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_EXEC_TIME_OPTIMIZATION_EFFORT="-1.0")


def run_compile(*args, timeout=1500):
    """`llmjax compile ...` from this (libtpu-free) environment: it finds libtpu in its own directory.
    The same arguments are compiled once per test process (the tests using one compile share an xdist_group)."""
    if args not in _COMPILED:
        _COMPILED[args] = _run_compile(*args, timeout=timeout)
    return _COMPILED[args]


def _run_compile(*args, timeout=1500):
    libtpu_path()  # install libtpu on first use
    out = subprocess.run([sys.executable, "-m", "llmjax.cli", "compile", *args], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO, env=COMPILE_ENV)
    lines = out.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return out, report


# ---------------------------------------------------------------------------------------------- fast
def test_topology_names():
    assert comp.parse_topology("v5p-128").jax_name == "v5p:4x4x4"  # v5p names count TensorCores
    assert comp.parse_topology("v5p-8").jax_name == "v5p:2x2x1"
    assert comp.parse_topology("v4-32").jax_name == "v4:2x2x4"
    assert comp.parse_topology("v5e-16").jax_name == "v5e:4x4"  # v5e names count chips
    assert comp.parse_topology("v5e:2x2").chips == 4
    with pytest.raises(ValueError, match="v5p-128"):
        comp.parse_topology("tpu7")


def test_replica_groups_and_cross_slice_collectives_are_read():
    assert comp.replica_groups("x, replica_groups={{0,1},{2,3}}, to_apply=add") == [[0, 1], [2, 3]]
    assert comp.replica_groups("x, replica_groups=[2,4]<=[8], dimensions={0}") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert comp.replica_groups("x, replica_groups=[4,2]<=[2,4]T(1,0), y") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert comp.replica_groups("x, source_target_pairs={{0,1},{1,0}}") == [[0, 1], [1, 0]]
    assert comp.replica_groups("x, replica_groups={}, to_apply=add") == []
    hlo = ("  a = f32[1024]{0} all-reduce(f32[1024]{0} g), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), "
           "use_global_device_ids=true, to_apply=add\n"
           "  b = f32[64,8]{1,0} all-gather(f32[16,8]{1,0} p), channel_id=2, replica_groups=[2,4]<=[8], "
           "dimensions={0}, use_global_device_ids=true\n")
    slice_of = [0, 0, 0, 0, 1, 1, 1, 1]  # devices 0-3 in slice 0, 4-7 in slice 1
    assert comp.cross_slice_collectives(hlo, slice_of) == [("all-reduce", 2 * 1024 * 4)]
    assert comp.collective_bytes(hlo) == 2 * 1024 * 4 + 64 * 8 * 4


def test_collectives_and_compiler_oom_message_are_read():
    hlo = ("%ag = bf16[2048,8192]{1,0} all-gather(bf16[32,8192]{1,0} %p), dimensions={0}\n"
           "%ar = f32[16]{0} all-reduce(f32[16]{0} %x), to_apply=%add\n"
           "%rs = (f32[4]{0}, f32[8]{0}) reduce-scatter-start(f32[16] %a, f32[32] %b)\n")
    assert comp.collective_bytes(hlo) == 2048 * 8192 * 2 + 2 * 16 * 4 + (4 + 8) * 4
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(550.34G) exceeds available HBM (95.74G).")
    assert comp._temporaries_from_oom(msg, hbm=95 * 2 ** 30, state=0) == int(550.34 * 2 ** 30)


def test_missing_libtpu_says_how_to_get_it(tmp_path):
    code = ("import sys, importlib.util as u; f = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'libtpu' else f(n, *a); "
            "from llmjax.cli import main; sys.exit(main(['llmjax'] + sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "compile", "--config", "configs/gpt_tiny.py"],
                         capture_output=True, text=True, cwd=REPO, timeout=120,
                         env=dict(os.environ, LLMJAX_LIBTPU_DIR=str(tmp_path / "none")))
    assert out.returncode == 2, out.stderr
    # The exact command that installs it where llmjax compile looks.
    none = tmp_path / "none"
    assert f"pip install --no-deps --upgrade --target {none}.partial {comp.LIBTPU} && mv {none}.partial {none}" \
        in out.stderr, out.stderr


def test_tpu_extra_pins_the_libtpu_llmjax_compile_uses():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tpu"] == [comp.LIBTPU]


def test_libtpu_install_is_atomic_and_one_at_a_time(tmp_path, monkeypatch):
    """A failed or killed install leaves no libtpu directory, the next one starts afresh; concurrent installers
    (the test workers) run pip once. pip is faked: it fills its --target like the real one."""
    target, partial = tmp_path / "libtpu-x", tmp_path / "libtpu-x.partial"
    calls = []

    def fake_pip(cmd, check):
        calls.append(cmd)
        filled = pathlib.Path(cmd[cmd.index("--target") + 1])
        assert filled == partial and not (filled / "stale").exists()
        (filled / "libtpu").mkdir(parents=True)
        time.sleep(0.2)  # so that a concurrent installer would run into this one
        (filled / "libtpu" / "__init__.py").write_text("")
        if len(calls) == 1:
            raise subprocess.CalledProcessError(1, cmd)  # fails half-way, as a killed install would stop

    monkeypatch.setattr(subprocess, "run", fake_pip)
    partial.mkdir()
    (partial / "stale").write_text("")  # an earlier killed install's leftovers
    with pytest.raises(subprocess.CalledProcessError):
        comp.install_libtpu(target)
    assert not target.exists()
    threads = [threading.Thread(target=comp.install_libtpu, args=(target,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2 and (target / "libtpu" / "__init__.py").is_file() and not partial.exists()


def test_auto_kernel_by_platform():
    assert resolve_kernel("auto", "tpu") == "splash"
    assert resolve_kernel("auto", "gpu") == "dot_product"
    assert resolve_kernel("auto", "cpu") == "cpu_flash"
    assert resolve_kernel("blockwise", "tpu") == "blockwise"


def _packed_inputs(t=256, n=4, kvh=2, h=64, b=2):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kk, (b, t, kvh, h)),
               jax.random.normal(kv, (b, t, kvh, h)))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t), (b, 1))
    seg[0, 100:], pos[0, 100:] = 2, np.arange(t - 100)  # two packed documents
    seg[1, t - 6:] = 0  # padding
    return q, k, v, jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_splash_kernel_matches_reference(causal):
    """The Pallas splash kernel (run by the Pallas interpreter on this CPU) equals the reference attention
    on packed, padded, grouped-query inputs, values and gradients."""
    q, k, v, seg, pos = _packed_inputs()
    mask = AttentionMask(seg, seg, pos, pos, None, causal=causal)
    assert splash_supported(q, k, mask)
    ref = lambda q, k, v: attend(q, k, v, mask, kernel="reference", scale=0.125)
    spl = lambda q, k, v: splash_attention(q, k, v, mask, scale=0.125, interpret=True)
    np.testing.assert_allclose(spl(q, k, v), ref(q, k, v), atol=2e-5)
    w = jax.random.normal(jax.random.key(1), q.shape)
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v) for f in (ref, spl)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=5e-5)
    # What splash cannot do (prefix LM, a bias) falls back to the reference kernel.
    assert not splash_supported(q, k, AttentionMask(seg, seg, pos, pos, seg > 0, causal=True))
    assert not splash_supported(q, k, mask, bias=jnp.zeros((1, 4, 256, 256)))


# ---------------------------------------------------------------------------------------------- slow
DEFAULT_ARGS = {c: ("--config", f"configs/{c}.py", "--topology", "v5e:2x2") for c in ("gpt_tiny", "bert_tiny", "t5_tiny")}


@pytest.mark.slow
@pytest.mark.parametrize("config", [pytest.param("gpt_tiny", marks=pytest.mark.xdist_group("compile_gpt_tiny")),
                                    "bert_tiny", "t5_tiny"])
def test_compile_each_family_on_v5e(config, tmp_path):
    out, r = run_compile(*DEFAULT_ARGS[config])
    assert out.returncode == 0, out.stderr[-3000:]
    assert r["fits"] and r["topology"]["chips"] == 4
    mem = r["memory_per_chip_bytes"]
    assert mem["parameters"] > 0 and mem["optimizer_state"] > mem["parameters"] and mem["temporaries"] > 0
    assert r["cost_per_chip"]["flops"] > 0 and 0 < r["estimated_mfu"] <= 1
    assert "memory per chip" in out.stdout and "fits" in out.stdout
    if config == "gpt_tiny":
        assert r["config"]["attention_kernel"] == "splash"


@pytest.mark.slow
@pytest.mark.xdist_group("compile_gpt_tiny")
def test_fsdp_over_four_chips_holds_a_quarter_of_the_parameters():
    mem = {}
    # Replicated on each chip (gpt_tiny's default mesh on 4 chips, data=4 x fsdp=1: the compile of
    # test_compile_each_family_on_v5e[gpt_tiny]), then sharded over the 4 chips.
    for data, fsdp in ((4, 1), (1, 4)):
        mesh = [] if fsdp == 1 else [f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}"]
        out, r = run_compile(*DEFAULT_ARGS["gpt_tiny"], *mesh)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (r["mesh"]["data"], r["mesh"]["fsdp"]) == (data, fsdp), r["mesh"]
        mem[fsdp] = r["memory_per_chip_bytes"]
    replicated, sharded = mem[1], mem[4]
    for part in ("parameters", "optimizer_state"):
        assert 0.24 < sharded[part] / replicated[part] < 0.27, (part, sharded[part], replicated[part])


@pytest.mark.slow
@pytest.mark.xdist_group("compile_gpt_tiny")
def test_a_scanned_stack_reports_the_costs_of_the_unrolled_one():
    """XLA's cost analysis counts a loop's body once; the report extrapolates a scanned model's FLOPs, HBM bytes
    and collectives from unrolled twins of 1 and 2 layers, so its estimate matches the unrolled model's."""
    _, unrolled = run_compile(*DEFAULT_ARGS["gpt_tiny"])
    out, scanned = run_compile(*DEFAULT_ARGS["gpt_tiny"], "--config.model.scan_layers=True")
    assert out.returncode == 0, out.stderr[-3000:]
    assert scanned["cost_compile_s"] > 0 and "unrolled twins" in out.stdout
    for key in ("flops", "bytes_accessed"):
        a, b = unrolled["cost_per_chip"][key], scanned["cost_per_chip"][key]
        assert abs(b - a) < 0.05 * a, (key, a, b)
    assert scanned["estimated_step_s"] == pytest.approx(unrolled["estimated_step_s"], rel=0.05)
    assert scanned["memory_per_chip_bytes"]["parameters"] == unrolled["memory_per_chip_bytes"]["parameters"]


@pytest.mark.slow
def test_two_slices_exchange_only_the_gradient_reduction_over_the_data_centre_network():
    """Two v5e:2x2 slices, the state sharded over the 4 chips of each slice (fsdp) and the data split across the
    slices (dcn_data=2): what crosses slices is the all-reduce of each chip's gradient shard (and the loss's
    scalars), nothing else."""
    out, r = run_compile(*DEFAULT_ARGS["gpt_tiny"], "--num-slices", "2", "--config.mesh.dcn_data=2",
                         "--config.mesh.data=1", "--config.mesh.fsdp=-1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert r["topology"]["chips"] == 8 and r["topology"]["slices"] == 2
    assert (r["mesh"]["data"], r["mesh"]["fsdp"]) == (2, 4), r["mesh"]
    cross = r["cross_slice"]
    assert set(cross["collectives"]) == {"all-reduce"}, cross
    # Each chip sends about its gradient shard, which has the parameter shard's size (float32 both).
    grads = r["memory_per_chip_bytes"]["parameters"]
    assert grads <= cross["bytes_per_chip"] <= 1.25 * grads, (cross, grads)
    assert cross["bytes_per_chip"] < r["collective_bytes_per_chip"] / 2  # the fsdp gathers stay in the slice
    assert "cross slices over the data-centre network" in out.stdout


@pytest.mark.slow
def test_config_that_does_not_fit_says_so_and_suggests_a_fix():
    # A 1.1B-parameter model replicated on each 16 GiB v5e chip: fp32 weights + Adam + gradients > 16 GiB
    # (1 very wide layer: the TPU compile takes about as long per layer whatever the width).
    big = ["--config", "configs/gpt_tiny.py", "--topology", "v5e:2x2", "--config.model.d_model=8192",
           "--config.model.num_heads=64", "--config.model.mlp_dim=49152", "--config.model.num_layers=1"]
    out, r = run_compile(*big, "--config.mesh.data=4", "--config.mesh.fsdp=1")
    assert out.returncode == 3, out.stderr[-3000:]
    assert not r["fits"] and r["memory_per_chip_bytes"]["peak"] > 16 * 2 ** 30
    assert "DOES NOT FIT" in out.stdout
    assert any("--config.mesh.fsdp=-1" in s for s in r["suggestions"]), r["suggestions"]
    # Following the suggestion makes it fit.
    out, r = run_compile(*big, "--config.mesh.data=1", "--config.mesh.fsdp=-1")
    assert out.returncode == 0 and r["fits"], out.stdout[-2000:]
