"""The documentation stays short and correct: README.md within 200 lines, every relative link (and #anchor)
in README.md and docs/**/*.md resolves, every configs/....py it mentions exists, and every `llmjax COMMAND`
in a fenced code block names a real command. Text checks, against the command line's own table of commands."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from llmjax import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 200
COMMANDS = tuple(cli.COMMANDS)  # the `llmjax` commands: the command line's own table
LAUNCH_TARGETS = ("local", "slurm", "k8s", "tpu-vm")
# The README's quick-start commands; .ci/run runs the second one verbatim.
TRAIN_COMMAND = ("python3 -m venv venv && . venv/bin/activate && pip install -e . && "
                 "llmjax train --config configs/gpt_tiny.py --workdir runs/gpt_tiny")
TEST_COMMAND = "python3 -m venv venv && . venv/bin/activate && pip install -e '.[test]' && pytest -n 2"

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
CONFIG_PATH = re.compile(r"(?<![\w./-])configs/[\w./{},*-]*?\.py\b")
LLMJAX_COMMAND = re.compile(r"(?:^|[\s;&|(])llmjax[ \t]+([A-Za-z][\w-]*)")


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def fenced_blocks(text: str) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code (where a `[x](y)` is not a link)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lower case, punctuation dropped, spaces
    to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Anchors of every heading outside fenced blocks; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", text)):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links of `text` (the file at `path`) whose file, or #anchor in a Markdown file, is missing."""
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{rel(path)}: link to {target!r}: {file_part} does not exist")
            continue
        if anchor and dest.suffix == ".md":
            dest_text = text if dest == path else dest.read_text(encoding="utf-8")
            if anchor not in anchors(dest_text):
                problems.append(f"{rel(path)}: link to {target!r}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def expand_braces(path: str) -> list[str]:
    """configs/finetune/{a,b}.py -> [configs/finetune/a.py, configs/finetune/b.py]."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def missing_configs(path: Path, text: str) -> list[str]:
    problems = []
    for mention in sorted(set(CONFIG_PATH.findall(text))):
        if "*" in mention:  # a glob such as configs/*.py names no file
            continue
        for config in expand_braces(mention):
            if not (ROOT / config).is_file():
                problems.append(f"{rel(path)}: {config} does not exist")
    return problems


def shell_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", block)
    return [re.sub(r"(^|\s)#.*$", "", line) for line in joined.splitlines()]


def unknown_commands(path: Path, text: str) -> list[str]:
    problems = []
    for block in fenced_blocks(text):
        for line in shell_lines(block):
            for m in LLMJAX_COMMAND.finditer(line):
                command = m.group(1)
                if command.isupper():  # a placeholder: llmjax COMMAND ...
                    continue
                if command not in COMMANDS:
                    problems.append(f"{rel(path)}: `llmjax {command}` is not a command ({', '.join(COMMANDS)})")
                    continue
                if command != "launch":
                    continue
                rest = line[m.end():].split()
                if rest and rest[0] not in LAUNCH_TARGETS and not rest[0].startswith("{"):
                    problems.append(f"{rel(path)}: `llmjax launch {rest[0]}`: the targets are "
                                    f"{', '.join(LAUNCH_TARGETS)}")
                if "--" in rest:  # the command each launched process runs
                    after = rest[rest.index("--") + 1:]
                    if after and after[0] not in COMMANDS and not after[0].isupper():
                        problems.append(f"{rel(path)}: `llmjax launch ... -- {after[0]}` is not a command")
    return problems


# ------------------------------------------------------------------------------------------------ tests
def test_readme_is_at_most_200_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines; keep it to {MAX_README_LINES} and move details "
                                   "into docs/")


def test_readme_has_the_quick_start_commands_verbatim():
    lines = {line.strip() for block in fenced_blocks(README.read_text(encoding="utf-8"))
             for line in block.splitlines()}
    for command in (TRAIN_COMMAND, TEST_COMMAND):
        assert command in lines, f"README.md lost the quick-start command, verbatim in a code block: {command}"


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_relative_links_resolve(path):
    assert broken_links(path, path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_mentioned_config_files_exist(path):
    assert missing_configs(path, path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_llmjax_commands_in_code_blocks_exist(path):
    assert unknown_commands(path, path.read_text(encoding="utf-8")) == []


def test_the_checks_catch_mistakes(tmp_path):
    """Each check reports a planted mistake (so the tests above cannot pass vacuously)."""
    page = tmp_path / "page.md"
    text = ("# Title\n\n## Some `code` heading!\n\nSee [a](missing.md), [b](#no-such-heading), "
            "[c](#some-code-heading), [d](https://example.com) and `[e](not-a-link.md)`.\n\n"
            "```bash\nllmjax train --config configs/no_such.py --workdir w\nllmjax trian --config x\n"
            "llmjax launch local -n 2 -- trian --config x\nllmjax launch moon -- train\n"
            "llmjax COMMAND --config FILE\nllmjax launch {local,slurm} -- COMMAND ...\n"
            "# llmjax is not a command in a comment\n```\n"
            "Also `configs/finetune/{doc_vs_code,nope}.py` and `configs/*.py`.\n")
    page.write_text(text)
    links = broken_links(page, text)
    assert len(links) == 2 and "missing.md" in links[0] and "#no-such-heading" in links[1]
    assert sorted(p.split(": ")[1] for p in missing_configs(page, text)) == [
        "configs/finetune/nope.py does not exist", "configs/no_such.py does not exist"]
    commands = unknown_commands(page, text)
    assert len(commands) == 3 and "trian" in commands[0] and "-- trian" in commands[1] and "moon" in commands[2]


def test_ci_runs_the_readme_test_command_in_a_fresh_virtualenv():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in lines and "rm -rf venv" in lines[: lines.index(TEST_COMMAND)]
