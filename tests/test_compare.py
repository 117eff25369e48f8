"""`llmjax compare`: budget matching, grid checks, and a 2-cell micro grid run end to end (interrupted after
one cell and resumed; a broken cell reported without losing the others)."""

import json
import pathlib
import shutil

import pytest

from helpers.cli_errors import user_error
from llmjax import compare
from llmjax.data.vocab import SpecialIds
from llmjax.models.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_default_grid_cells_are_matched_on_flops_and_cover_the_required_pairs():
    grid = compare.load_grid(ROOT / "configs/compare/objectives.py")
    pairs = set()
    totals = []
    for cell in grid.cells:
        cfg = compare.cell_config(grid, cell, "/nonexistent")
        steps, per_step = compare.budget_steps(cfg, SpecialIds(cfg.model.vocab_size), grid.budget_flops)
        totals.append(steps * per_step)
        causal = not cfg.objective_args.get("bidirectional_inputs", True) or cfg.objective == "causal_lm"
        pairs.add((cfg.model.family, cfg.objective, causal if cfg.model.family == "decoder" else None))
    assert {("decoder", "causal_lm", True), ("decoder", "prefix_lm", False),
            ("encoder_decoder", "span_corruption", None), ("encoder_decoder", "prefix_lm", None),
            ("encoder", "mlm", None), ("decoder", "span_corruption", True),
            ("decoder", "ul2", False), ("encoder_decoder", "ul2", None)} <= pairs
    assert max(totals) / min(totals) < 1.05
    assert all(abs(t - grid.budget_flops) / grid.budget_flops < 0.025 for t in totals)


def test_encoder_decoder_cells_spend_the_budget_on_more_steps():
    """FLOPs, not steps, are matched: a span-corruption encoder-decoder (short targets) gets more steps."""
    grid = compare.load_grid(ROOT / "configs/compare/objectives.py")
    by_name = {c["name"]: c for c in grid.cells}
    steps = {}
    for name in ("causal_decoder.causal_lm", "encoder_decoder.span_corruption"):
        cfg = compare.cell_config(grid, by_name[name], "/nonexistent")
        steps[name] = compare.budget_steps(cfg, SpecialIds(8192), grid.budget_flops)[0]
    assert steps["encoder_decoder.span_corruption"] > 1.5 * steps["causal_decoder.causal_lm"]


def test_grid_mistakes_are_named(capsys, tmp_path):
    grid = compare.load_grid(ROOT / "configs/compare/micro.py")
    grid.cells = [grid.cells[0], dict(grid.cells[0])]
    with pytest.raises(ConfigError, match="names must be unique"):
        compare.check_grid(grid)
    other = dict(grid.cells[0], name="other", model=dict(grid.cells[0]["model"], vocab_size=2000))
    grid.cells = [grid.cells[0], other]
    with pytest.raises(ConfigError, match="same model.vocab_size"):
        compare.check_grid(grid)
    bad = dict(grid.cells[0], name="bad", model=dict(grid.cells[0]["model"], num_heads=3))  # 64 % 3 != 0
    grid.cells = [grid.cells[0], bad]
    with pytest.raises(ConfigError, match=r"grid cell 'bad': .*num_heads"):
        compare.compare(grid, tmp_path / "w")
    assert not (tmp_path / "w" / "cells").exists()  # refused before anything ran
    assert "does not exist" in user_error(["llmjax", "compare", "--grid", str(tmp_path / "nope.py"), "--workdir",
                                           str(tmp_path)], capsys)


@pytest.mark.slow
def test_micro_grid_runs_resumes_and_reports(tmp_path, caplog):
    caplog.set_level("INFO", logger="llmjax")
    grid = compare.load_grid(ROOT / "configs/compare/micro.py")
    # Fails at run time: a global batch of 6 rows cannot be split over the 8 devices of the test session.
    broken = dict(grid.cells[0], name="broken", train=dict(batch_size=6))
    grid.cells = list(grid.cells) + [broken]
    work = tmp_path / "cmp"
    names = [c["name"] for c in grid.cells]

    first = compare.compare(grid, work, max_cells=1)  # "interrupted" after one cell
    assert [c["status"] for c in first["cells"]] == ["done", "pending", "pending"]
    done = work / "cells" / names[0]
    stamp = {p: p.stat().st_mtime_ns for p in (done / "cell.json", done / "metrics.jsonl")}
    assert not (work / "cells" / names[1]).exists()

    caplog.clear()
    results = compare.compare(grid, work)
    assert f"cell {names[0]}: finished earlier, skipping" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # the finished cell was not trained again
    status = {c["name"]: c for c in results["cells"]}
    assert status[names[1]]["status"] == "done"
    assert status["broken"]["status"] == "failed" and "batch_size" in status["broken"]["error"]

    # The outputs: a table with the columns, results.json, two plots.
    table = (work / "RESULTS.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| cell"))
    assert [h.strip() for h in header.strip("|").split("|")] == list(compare.COLUMNS)
    assert all(f"| {n} |" in table for n in names)
    saved = json.loads((work / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for name in ("loss_vs_flops.png", "yardsticks.png"):
        assert (work / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = [status[n] for n in names[:2]]
    flops = [c["train_flops"] for c in cells]
    assert max(flops) / min(flops) < 1.05 and cells[0]["steps"] != cells[1]["steps"]
    for c in cells:
        assert c["params"] > 0 and c["curve"] and c["curve"][-1][0] <= c["train_flops"] * 1.0001
        assert 0.0 <= c["infill_accuracy"] <= 1.0 and 0.0 <= c["probe_accuracy"] <= 1.0
        assert 0.0 <= c["name_exact_match"] <= 1.0 and 0.0 < c["name_token_accuracy"] <= 1.0
        assert set(c["phase_seconds"]) == {"train", "infill_accuracy", "probe_accuracy", "downstream",
                                           "continuation_ppl"}
        assert c["continuation_ppl"] > 1.0  # both families are scored on the same held-out continuations
    # Running again retries only the failed cell; nothing else is retrained.
    again = compare.compare(grid, work)
    assert [c["status"] for c in again["cells"]] == ["done", "done", "failed"]


# ------------------------------------------------------------------------------------------------ seeds
def _run(k, status="done", **metrics):
    run = {"seed_index": k, "seed": k, "status": status}
    if status == "done":
        run.update(name="run", family="decoder", objective="causal_lm", params=10, steps=3, train_flops=1e9,
                   seconds=60.0, curve=[[1.0, 5.0 + k], [2.0, 4.0 + k]], own_loss=None, continuation_ppl=None,
                   infill_accuracy=None, probe_accuracy=None)
        run.update(metrics)
    else:
        run["error"] = "ValueError: boom"
    return run


def _cell(name):
    return {"name": name, "objective": "causal_lm", "model": {"family": "decoder"}}


def test_seed_k_changes_the_train_seed_and_seed_0_is_the_single_seed_cell(tmp_path):
    grid = compare.load_grid(ROOT / "configs/compare/micro.py")
    grid.seed = 5
    cell = grid.cells[0]
    cfgs = [compare.cell_config(grid, cell, "/d", k) for k in range(3)]
    assert [c.train.seed for c in cfgs] == [5, 6, 7]  # train.seed seeds both the init and the data order
    assert compare.cell_config(grid, cell, "/d").to_dict() == cfgs[0].to_dict()
    assert compare.seed_dir(tmp_path, cell["name"], 0) == tmp_path / "cells" / cell["name"]
    assert compare.seed_dir(tmp_path, cell["name"], 2) == tmp_path / "cells" / cell["name"] / "seed2"
    grid.seeds = 0
    with pytest.raises(ConfigError, match=r"grid.seeds \(--seeds\) must be an integer >= 1"):
        compare.check_grid(grid)


def test_mean_std_and_separation_marks_over_seeds():
    a = compare.aggregate(_cell("a"), [_run(0, infill_accuracy=0.30, continuation_ppl=100.0, own_loss=4.0),
                                      _run(1, infill_accuracy=0.34, continuation_ppl=110.0, own_loss=4.2)])
    b = compare.aggregate(_cell("b"), [_run(0, infill_accuracy=0.20, continuation_ppl=104.0),
                                      _run(1, infill_accuracy=0.22, continuation_ppl=108.0)])
    c = compare.aggregate(_cell("c"), [_run(0, infill_accuracy=0.31), _run(1, status="failed")])
    assert a["status"] == "done" and a["seconds"] == 120.0 and len(a["runs"]) == 2 and a["name"] == "a"
    assert a["infill_accuracy"] == pytest.approx(0.32) and a["infill_accuracy_std"] == pytest.approx(0.02 * 2 ** 0.5)
    assert a["own_loss"] == pytest.approx(4.1) and a["probe_accuracy"] is None and a["probe_accuracy_std"] is None
    assert c["status"] == "failed" and c["error"] == "seed 1: ValueError: boom" and c["seeds_done"] == 1
    compare.mark_separated([a, b, c])
    # infill: best a (0.32 +- 0.028); b (0.21 +- 0.014) is 0.11 away > 0.028 + 0.014: separated.
    # ppl (lower is better): best a (105 +- 7.1); b (106 +- 2.8) is 1 away < 7.1 + 2.8: not separated.
    assert a["separated"] == {"infill_accuracy": False, "continuation_ppl": False}
    assert b["separated"] == {"infill_accuracy": True, "continuation_ppl": False}
    assert c["separated"] == {}  # not finished: no mark

    one = [compare.aggregate(_cell(n), [_run(0, infill_accuracy=v)]) for n, v in (("a", 0.9), ("b", 0.1))]
    compare.mark_separated(one)  # one seed: no spread, no marks
    assert one[0]["infill_accuracy_std"] is None and all(r["separated"] == {} for r in one)


def test_table_shows_mean_std_and_marks_and_plots_the_spread(tmp_path):
    rows = [compare.aggregate(_cell("a"), [_run(0, infill_accuracy=0.30), _run(1, infill_accuracy=0.34)]),
            compare.aggregate(_cell("b"), [_run(0, infill_accuracy=0.20), _run(1, infill_accuracy=0.22)]),
            compare.aggregate(_cell("c"), [_run(0, infill_accuracy=0.2), _run(1, status="pending")])]
    compare.mark_separated(rows)
    results = {"budget_flops": 1e9, "seed": 0, "seeds": 2, "yardsticks": compare.default_grid().yardsticks.to_dict(),
               "cells": rows}
    table = compare.results_table(results).splitlines()
    assert "| 0.320 ± 0.028 |" in table[2] and "| 0.210 ± 0.014† |" in table[3]
    assert "| 2.0 | done |" in table[2]  # minutes: both seeds
    assert table[4].endswith("| pending (1/2 seeds done) |")
    assert compare.seed_band(rows[0]["runs"]) == ([1.0, 2.0], [5.5, 4.5], [5.0, 4.0], [6.0, 5.0])
    compare.write_outputs(results, tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "mean ± standard deviation over the 2 seeds" in text and "train seeds 0..1" in text
    assert json.loads((tmp_path / "results.json").read_text())["cells"][0]["runs"][1]["infill_accuracy"] == 0.34
    single = compare.aggregate(_cell("a"), [_run(0, infill_accuracy=0.30)])
    compare.mark_separated([single])
    assert "| 0.300 |" in compare.results_table(dict(results, seeds=1, cells=[single]))


def test_resume_skips_finished_seed_runs_and_retries_failed_ones(tmp_path):
    grid = compare.load_grid(ROOT / "configs/compare/micro.py")
    grid.seeds = 2
    calls, fail = [], {("encoder_decoder.span_corruption", 1)}

    def run_one(cell, k, out):
        calls.append((cell["name"], k))
        if (cell["name"], k) in fail:
            raise RuntimeError("broken seed")
        return {"k": k}

    assert compare.run_pending(grid, tmp_path, run_one, max_cells=3) == 3
    names = [c["name"] for c in grid.cells]
    assert calls == [(names[0], 0), (names[0], 1), (names[1], 0)]
    assert json.loads((tmp_path / "cells" / names[0] / "seed1" / "cell.json").read_text()) == {"k": 1}
    calls.clear()
    assert compare.run_pending(grid, tmp_path, run_one) == 1  # only the seed that never ran
    assert calls == [(names[1], 1)] and (tmp_path / "cells" / names[1] / "seed1" / "error.txt").exists()
    calls.clear()
    fail.clear()
    assert compare.run_pending(grid, tmp_path, run_one) == 1 and calls == [(names[1], 1)]  # the failed one, retried
    assert compare.run_pending(grid, tmp_path, run_one) == 0


def test_seeds_flag_must_be_positive(capsys, tmp_path):
    msg = user_error(["llmjax", "compare", "--grid", str(ROOT / "configs/compare/micro.py"), "--workdir",
                      str(tmp_path), "--seeds", "0"], capsys)
    assert "--seeds must be >= 1, got 0" in msg


@pytest.mark.slow
def test_two_seeds_of_a_real_cell_differ_and_seed_0_reproduces_the_single_seed_cell(tmp_path):
    grid = compare.load_grid(ROOT / "configs/compare/micro.py")
    grid.cells = grid.cells[:1]
    grid.budget_flops = 3e9
    grid.train.update(eval_every=1000, checkpoint_every=1000)  # one evaluation and one checkpoint, at the end
    grid.yardsticks.update(eval_windows=16, lm_adapt_steps=2, probe_train_examples=32, probe_eval_examples=16,
                           probe_steps=2, downstream_steps=0)  # no downstream yardstick (the micro grid has it)
    grid.seeds = 2
    work = tmp_path / "w"
    first = compare.compare(grid, work)["cells"][0]
    s0, s1 = first["runs"]
    assert (s0["seed"], s1["seed"]) == (0, 1) and first["status"] == "done"
    assert s0["curve"][0][1] != s1["curve"][0][1]  # another init and other batches from the first step
    assert s0["own_loss"] != s1["own_loss"] and first["own_loss_std"] > 0
    # Seed 0 trained again from scratch (its directory is the single-seed cell's): the same numbers; the
    # finished seed 1 is not trained again.
    seed1 = work / "cells" / grid.cells[0]["name"] / "seed1"
    stamp = (seed1 / "cell.json").stat().st_mtime_ns
    for p in sorted(seed1.parent.iterdir()):
        if p != seed1:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    again = compare.compare(grid, work)["cells"][0]["runs"]
    keys = ("own_loss", "continuation_ppl", "infill_accuracy", "probe_accuracy", "curve")
    assert {k: again[0][k] for k in keys} == {k: s0[k] for k in keys}
    assert s0["name_exact_match"] is None and "n/a" in (work / "RESULTS.md").read_text()
    assert (seed1 / "cell.json").stat().st_mtime_ns == stamp and again[1] == s1
    cfg = json.loads((seed1 / "config.json").read_text())
    assert cfg["train"]["seed"] == 1
