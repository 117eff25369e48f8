"""`llmjax <command> --config FILE [--config.a.b=value ...]`: the command line, kept thin.

Commands: prepare (tokenizer + token shards), train (the main job; resumes from WORKDIR/checkpoints),
export (`llmjax export --workdir DIR --out DIR2`: parameters of the newest good checkpoint + config.json).
Overrides use ml_collections' dotted syntax.
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

COMMANDS = ("prepare", "train", "export", "launch")
# Commands that live in their own module: name -> "module:function"; the function takes the arguments
# after the command name and returns the exit code. `parse_config_flags` below serves those taking --config.
MODULE_COMMANDS = {
    "generate": "llmjax.generate:generate_main",
    "fill": "llmjax.generate:fill_main",
    "finetune": "llmjax.finetune:finetune_main",
    "merge-lora": "llmjax.finetune:merge_lora_main",
    "compile": "llmjax.compile:compile_main",
    "compare": "llmjax.compare:compare_main",
}


def parse_config_flags(argv: list[str], define=None, *, config_required: bool = True):
    """Parse `argv` (argv[0] = program name) with absl: --config FILE plus --config.a.b=value overrides,
    --workdir, and whatever flags `define(flag_values)` adds. Returns the FlagValues; user errors exit
    with a message naming the flag or field."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py)", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (prepared data goes to WORKDIR/data by default)", flag_values=fv)
    if define is not None:
        define(fv)
    saved = sys.argv
    sys.argv = argv  # config_flags finds the --config.x overrides by reading sys.argv
    try:
        fv(argv)
    except flags.Error as e:
        raise SystemExit(f"llmjax: {e}")
    except (AttributeError, KeyError) as e:  # an override naming a field the config does not have
        bad = [a for a in argv if a.startswith("--config.")]
        raise SystemExit(f"llmjax: unknown config field {e} in {' '.join(bad)}; see the config file for the fields")
    finally:
        sys.argv = saved
    if fv.config is None and config_required:
        raise SystemExit("llmjax: --config is required, e.g. --config configs/gpt_tiny.py")
    return fv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    names = COMMANDS + tuple(MODULE_COMMANDS)
    if len(argv) < 2 or argv[1] not in names:
        print(f"usage: llmjax {{{'|'.join(names)}}} --config FILE [--config.x=y ...] [--workdir DIR]",
              file=sys.stderr)
        return 2
    command = argv[1]
    if command in ("train", "finetune", "compare"):  # many steps: reuse XLA:CPU's per-step host memory
        import llmjax

        llmjax.keep_freed_host_memory()
    if command in MODULE_COMMANDS:
        import importlib

        module, function = MODULE_COMMANDS[command].split(":")
        return getattr(importlib.import_module(module), function)(argv[2:])
    if command == "launch":  # its own argparse: llmjax launch {local,slurm,k8s,tpu-vm} ... -- COMMAND
        from llmjax.launch import main as launch_main

        return launch_main(argv[2:])
    if command == "export":
        return _export(argv[2:])
    fv = parse_config_flags([argv[0]] + argv[2:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = fv.config
    if command == "prepare":
        from llmjax.data.prepare import prepare

        if cfg.data.vocab_size != cfg.model.vocab_size:
            raise SystemExit(
                f"llmjax: data.vocab_size={cfg.data.vocab_size} differs from model.vocab_size={cfg.model.vocab_size}; "
                "set both to the same value")
        manifest = prepare(cfg.data, fv.workdir)
        splits = manifest["splits"]
        print(f"prepared data in {manifest['dir']}: "
              + ", ".join(f"{k}: {v['documents']} documents, {v['tokens']} tokens" for k, v in splits.items()))
    elif command == "train":
        from llmjax.train import train_and_evaluate

        if not fv.workdir:
            raise SystemExit("llmjax: train needs --workdir DIR (config, metrics, plots and checkpoints go there)")
        import jax

        from llmjax.launch import maybe_initialize_distributed

        maybe_initialize_distributed()  # joins a multi-process run (launcher env vars or srun); else nothing
        logging.info("JAX %s devices: %s", jax.default_backend(), jax.devices())
        from llmjax.models.config import ConfigError

        try:
            train_and_evaluate(cfg, fv.workdir)
        except ConfigError as e:  # a user error: the message names the field and the fix
            raise SystemExit(f"llmjax: {e}") from None
    return 0


def _export(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="llmjax export", description="parameters of the newest good checkpoint "
                                     "in WORKDIR/checkpoints -> OUT/params (Orbax) + OUT/config.json")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    ns = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from llmjax.checkpoint import export

    try:
        step = export(ns.workdir, ns.out)
    except (FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"llmjax export: {e}")
    print(f"exported the parameters of step {step} to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
