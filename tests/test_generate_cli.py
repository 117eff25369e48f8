"""`llmjax generate` and `llmjax fill`: continuations and mask predictions from training workdirs and export
directories, and clear errors for bad input (naming the flag or file)."""

import re

import pytest

from helpers import tiny_runs
from llmjax import cli


def main(*args) -> int:
    return cli.main(["llmjax", *map(str, args)])


def fails(*args) -> str:
    with pytest.raises(SystemExit) as e:
        main(*args)
    return str(e.value)


# ------------------------------------------------------------------------------------ export directories
def test_generate_prints_one_continuation_per_prompt_for_each_method(capsys):
    export = tiny_runs.random_export("decoder")
    for method in (["--method", "greedy"], ["--method", "sample", "--temperature", "0.8", "--top-k", "5"],
                   ["--method", "beam", "--num-beams", "2"]):
        assert main("generate", "--workdir", export, "--prompt", "three four", "--prompt", "monday",
                    "--max-new-tokens", 5, *method) == 0
        header, out = capsys.readouterr().out.split("\n", 1)
        assert header.startswith(f"# export {export}: decoder model, {method[1]} decoding")
        # one line per prompt; not splitlines(): a random model may emit form feeds, which it splits at
        assert out.startswith("[1] three four") and re.findall(r"^\[\d+\] ", out, re.M) == ["[1] ", "[2] "], out
        assert out.split("\n[2] ")[1].startswith("monday"), out


def test_generate_encoder_decoder_and_fill_on_encoder(capsys):
    assert main("generate", "--workdir", tiny_runs.random_export("encoder_decoder"), "--prompt",
                "one two <extra_id_0> four", "--max-new-tokens", 4) == 0
    out = capsys.readouterr().out
    assert "encoder_decoder model" in out and "[1] one two <extra_id_0> four => " in out
    assert main("fill", "--workdir", tiny_runs.random_export("encoder"), "--text", "one [MASK] three [MASK]",
                "--top", 3) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("]")[0] for line in lines[1:3]] == ["[MASK 1", "[MASK 2"]
    assert all(line.count(",") == 2 for line in lines[1:3]), lines  # three predictions each
    assert lines[3].startswith("best: one ") and "[MASK]" not in lines[3]


def test_bad_input_is_named(tmp_path):
    decoder, encoder = tiny_runs.random_export("decoder"), tiny_runs.random_export("encoder")
    assert f"--workdir {tmp_path / 'nope'} does not exist" in fails("generate", "--workdir", tmp_path / "nope",
                                                                     "--prompt", "x")
    assert "has no checkpoints/" in fails("generate", "--workdir", tmp_path, "--prompt", "x")
    assert "no [MASK] token" in fails("fill", "--workdir", encoder, "--text", "one two three")
    msg = fails("fill", "--workdir", decoder, "--text", "one [MASK] three")
    assert "holds a decoder model" in msg and "llmjax generate" in msg
    msg = fails("generate", "--workdir", encoder, "--prompt", "one")
    assert "encoder (BERT-style) model" in msg and "llmjax fill" in msg
    assert "--top-k" in fails("generate", "--workdir", decoder, "--prompt", "one", "--top-k", 100000)
    assert "--max-new-tokens" in fails("generate", "--workdir", decoder, "--prompt", "one", "--max-new-tokens", 0)
    assert "model.max_length=64" in fails("generate", "--workdir", decoder, "--prompt", "one",
                                          "--max-new-tokens", 200)
    assert "--top must be at least 1" in fails("fill", "--workdir", encoder, "--text", "[MASK]", "--top", 0)
    assert "does not exist" in fails("generate", "--workdir", decoder, "--prompt", "one", "--tokenizer",
                                     tmp_path / "x.model")
    with pytest.raises(SystemExit):  # argparse: --prompt is required
        main("generate", "--workdir", decoder)


# ------------------------------------------------------------------------------ tiny trained checkpoints
@pytest.mark.slow
def test_generate_continues_the_counting_pattern_of_a_trained_decoder(capsys):
    """A tiny GPT trained for 60 steps on runs of number words / weekdays / months continues them."""
    workdir = tiny_runs.tiny_run("decoder")
    capsys.readouterr()
    assert main("generate", "--workdir", workdir, "--prompt", "three four five", "--prompt", "monday tuesday",
                "--max-new-tokens", 4) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"# {workdir}, step 60: decoder model")
    assert lines[1].startswith("[1] three four five six seven eight"), lines
    assert lines[2].startswith("[2] monday tuesday wednesday thursday"), lines
    # The same through an export directory (llmjax export; the tokenizer is passed explicitly).
    export = workdir.parent / "decoder_export"
    assert main("export", "--workdir", workdir, "--out", export) == 0
    tokenizer = next((workdir.parent / "data").glob("*/tokenizer.model"))
    assert main("generate", "--workdir", export, "--tokenizer", tokenizer, "--prompt", "three four five",
                "--max-new-tokens", 3, "--method", "beam") == 0
    assert "[1] three four five six seven eight" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run_encoder")  # with test_finetune's workdir test: tiny_run("encoder") trained once
def test_fill_predicts_masked_words_of_a_trained_encoder(capsys):
    workdir = tiny_runs.tiny_run("encoder")
    capsys.readouterr()
    for text, words in (("three four [MASK] six seven", tiny_runs.NUMBERS),
                        ("monday [MASK] wednesday thursday", tiny_runs.DAYS)):
        assert main("fill", "--workdir", workdir, "--text", text, "--top", 3) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0].startswith(f"# {workdir}, step {tiny_runs.STEPS['encoder']}: encoder model")
        # 300 steps teach the tiny model which cycle a run belongs to: every proposal is a word of it.
        proposed = [p.split("'")[1] for p in lines[1].split("] ")[1].split(", ")]
        assert len(proposed) == 3 and set(proposed) <= set(words), lines
        assert lines[2].startswith("best: ") and "[MASK]" not in lines[2]


@pytest.mark.slow
def test_generate_from_a_trained_encoder_decoder(capsys):
    workdir = tiny_runs.tiny_run("encoder_decoder")
    capsys.readouterr()
    assert main("generate", "--workdir", workdir, "--prompt", "three four <extra_id_0> six seven",
                "--max-new-tokens", 6) == 0
    out = capsys.readouterr().out
    assert "[1] three four <extra_id_0> six seven => <extra_id_0>" in out, out
