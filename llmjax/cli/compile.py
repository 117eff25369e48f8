"""`llmjax compile --config FILE --topology v5p-128 [--config.x=y ...] [--json OUT]`: compile the real sharded
train step ahead of time for a TPU topology on this machine (libtpu, no TPU needed) and report per-chip memory,
whether it fits the chip's HBM, and the compiler's FLOPs and collectives."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
from absl import flags

from llmjax.cli.flags import parse_config_flags
from llmjax.compile import compile_for_topology, format_report, how_to_get_libtpu, parse_topology, use_libtpu

EXAMPLE = "llmjax compile --config configs/llama_7b.py --topology v5p-128 --config.mesh.data=1 --config.mesh.fsdp=-1"


def _define(fv):
    flags.DEFINE_string("topology", "v5e:2x2", "TPU slice: v5p-128, v5e-16, v4-32, v6e-8, or v5e:2x2, v5p:4x4x4",
                        flag_values=fv)
    flags.DEFINE_string("kernel", None, "attention kernel to compile with (default: the config's; 'auto' = splash)",
                        flag_values=fv)
    flags.DEFINE_string("json", None, "also write the report to this JSON file", flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "slices of TOPOLOGY joined by the data-centre network (multi-slice); the "
                         "config's mesh.dcn_* axes must multiply to it", lower_bound=1, flag_values=fv)


def main(args: list[str]) -> int:
    """Exit code 0 when it compiles and fits, 3 when it compiles but does not fit, 2 when libtpu is missing."""
    fv = parse_config_flags(["llmjax compile", *args], define=_define, about=__doc__.split("\n\n")[0],
                            example=EXAMPLE)
    try:
        topology = parse_topology(fv.topology)
    except ValueError as e:
        raise SystemExit(f"llmjax compile: --{e}")
    if not use_libtpu():
        print(how_to_get_libtpu(), file=sys.stderr)
        return 2
    if not jax.config.jax_platforms:  # libtpu only compiles; nothing runs on a TPU (JAX is imported, not started)
        jax.config.update("jax_platforms", "cpu")
    # Compiling touches no TPU, so several compiles may share the machine (libtpu otherwise takes a lock).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # A ConfigError becomes one line in cli.main.
    report = compile_for_topology(fv.config, topology, kernel=fv.kernel, num_slices=fv.num_slices)
    print(format_report(report))
    if fv.json:
        Path(fv.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)  # last line: machine-readable
    return 0 if report["fits"] else 3
