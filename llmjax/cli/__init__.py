"""`llmjax <command> [flags]`: the command line. Each command is one module of this package with a `main(args)`
returning the exit code; this table is the one list of them. Library modules never import this package.

Before a command module (and with it JAX) is imported, the process settings of llmjax.runtime are applied.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from llmjax import runtime

# name -> (module in llmjax.cli, one line for `llmjax --help`, runs many steps (keep_freed_host_memory))
COMMANDS = {
    "prepare": ("prepare", "train the tokenizer and tokenize the corpus into shards", False),
    "train": ("train", "pretrain a model (resumes from WORKDIR/checkpoints)", True),
    "export": ("export", "parameters of a run's newest good checkpoint + config.json", False),
    "finetune": ("finetune", "fine-tune a pretrained run on a task, fully or with LoRA", True),
    "merge-lora": ("merge_lora", "fold a LoRA fine-tuning run's adapters into the base weights", False),
    "generate": ("generate", "continue prompts with a decoder or encoder-decoder run", False),
    "fill": ("fill", "predict the [MASK] tokens of a text with an encoder run", False),
    "compare": ("compare", "compare objectives and families at a fixed FLOP budget", True),
    "compile": ("compile", "compile the sharded train step for a TPU topology, on this CPU", False),
    "launch": ("launch", "run a command as a multi-process job: local, SLURM, Kubernetes, TPU VM", False),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llmjax <command> [flags]   (llmjax <command> --help lists a command's flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about, _) in COMMANDS.items()]
    lines += ["", "example: llmjax train --config configs/gpt_tiny.py --workdir runs/gpt_tiny"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("--help", "-h", "help"):
        print(usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        return 0 if len(argv) >= 2 else 2
    command = argv[1]
    if command not in COMMANDS:
        near = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        print(f"llmjax: unknown command '{command}'; {hint}`llmjax --help` lists the commands", file=sys.stderr)
        return 2
    module, _, many_steps = COMMANDS[command]
    runtime.prepare_process(many_steps=many_steps)
    return importlib.import_module(f"{__name__}.{module}").main(argv[2:])
