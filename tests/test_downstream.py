"""The downstream yardstick of `llmjax compare` (docstring -> name): the task's split, each family's format,
greedy names equal to `llmjax.generate`'s (an independent, KV-cached decoder), and exact match."""

import dataclasses
import functools

import numpy as np
import pytest

from llmjax import compare, downstream
from llmjax.config import base_config
from llmjax.data import corpus, tasks
from llmjax.data.vocab import SpecialIds
from llmjax.generate import generate
from llmjax.models.config import ModelConfig
from llmjax.models.transformer import build_model
from llmjax.presets import model_preset

V = 211
IDS = SpecialIds(V, num_sentinels=20)
COMMON = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, mlp_dim=48, max_length=64, init_std=0.2,
              dropout_rate=0.0)
RNG = np.random.default_rng(0)
# (input ids, name ids): inputs of several lengths, so the rows are padded differently
PAIRS = [(RNG.integers(20, V - 20, n).astype(np.int32), RNG.integers(20, V - 20, m).astype(np.int32))
         for n, m in [(7, 2), (3, 4), (12, 1), (1, 3), (9, 2)]]


@functools.lru_cache(maxsize=None)
def _model(family):
    return build_model(ModelConfig(family=family, **COMMON), 0)


def test_the_task_is_split_by_module_and_written_as_text_to_text(tmp_path):
    """The files hold every public documented name of the stdlib, each module's pairs on one side of the split
    (the seeded module hash of doc_vs_code), and read back as a text_to_text task."""
    want = {"train": [], "validation": []}
    for module, name, summary in corpus.docstring_names():
        want[tasks._split_of_module(module, 0.2, 0)].append({"input": summary, "target": name})
    assert len(want["train"]) > 2000 and len(want["validation"]) > 500
    assert all(r["input"] and r["target"].isidentifier() and not r["target"].startswith("_")
               for split in want.values() for r in split)
    stats = tasks.docstring_to_name(tmp_path)
    for split in ("train", "validation"):
        assert stats[split]["rows"] == len(want[split])
        rows = tasks.read_rows(tmp_path / f"{split}.jsonl", "text_to_text")
        assert [{"input": r["input"], "target": r["target"]} for r in rows] == want[split]


@pytest.mark.parametrize("family,mode,prefix_lm", [("decoder", None, False), ("decoder", IDS.mode("[S2S]"), True),
                                                   ("encoder_decoder", None, False),
                                                   ("encoder_decoder", IDS.mode("[S2S]"), False)])
def test_greedy_names_equal_generate_and_the_batch_weights_only_the_name(family, mode, prefix_lm):
    fmt = downstream.Format(family, input_length=12, target_length=5, mode=mode, prefix_lm=prefix_lm)
    model = _model(family)
    got = downstream.predict(model, PAIRS, IDS, fmt)
    lead = [] if mode is None else [mode]
    if family == "decoder":
        prompts = [[IDS.bos, *lead, *x, IDS.sep] for x, _ in PAIRS]
    else:
        prompts = [[*lead, *x, IDS.eos] for x, _ in PAIRS]
    out = generate(model, prompts, max_new_tokens=5, eos_id=IDS.eos, pad_id=IDS.pad, prefix_lm=prefix_lm)
    for g, want in zip(got, np.asarray(out.tokens)):
        end = np.flatnonzero(want == IDS.eos)
        np.testing.assert_array_equal(g, want[:end[0]] if len(end) else want)
    # the training batch: teacher-forced name ++ [eos], weights on exactly those tokens
    b = downstream.batch(PAIRS, IDS, fmt)
    weights, targets = ((b["weights"], b["targets"]) if family == "decoder" else
                        (b["decoder_weights"], b["decoder_targets"]))
    for i, (_, y) in enumerate(PAIRS):
        np.testing.assert_array_equal(targets[i][weights[i] > 0], np.concatenate([y, [IDS.eos]]))
    if prefix_lm:  # the prefix mask covers [bos] lead x [sep] and nothing of the name
        np.testing.assert_array_equal(b["prefix_mask"].sum(1), [len(lead) + len(x) + 2 for x, _ in PAIRS])


def test_the_encoder_fills_its_slots_in_one_pass():
    fmt = downstream.Format("encoder", input_length=12, target_length=5)
    model = _model("encoder")
    b = downstream.batch(PAIRS, IDS, fmt)
    for i, (x, y) in enumerate(PAIRS):
        slots = slice(len(x) + 2, len(x) + 2 + 5)
        assert (b["inputs"][i, slots] == IDS.mask).all()
        np.testing.assert_array_equal(b["targets"][i, slots][:len(y)], y)
        assert (b["targets"][i, slots][len(y):] == IDS.eos).all()
        np.testing.assert_array_equal(np.flatnonzero(b["weights"][i]), np.arange(len(y) + 1) + len(x) + 2)
    out = model(b["inputs"], b["segment_ids"], b["positions"], np.zeros_like(b["inputs"]))["mlm_logits"]
    best = np.asarray(out).argmax(-1)
    got = downstream.predict(model, PAIRS, IDS, fmt)
    for i, (x, _) in enumerate(PAIRS):
        slot = best[i, len(x) + 2:len(x) + 7]
        end = np.flatnonzero(slot == IDS.eos)
        np.testing.assert_array_equal(got[i], slot[:end[0]] if len(end) else slot)


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder", "encoder"])
def test_exact_match_and_token_accuracy_of_the_names_written(family):
    """Pairs whose names are the model's own greedy names score 1 on both; one changed name loses its exact
    match and some token accuracy. A random model rarely writes [eos], so the test makes the token it writes
    most often the end token. Batches of 4: the last one may be padded and its padding not counted."""
    fmt = downstream.Format(family, input_length=12, target_length=5)
    model = _model(family)
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(20, V - 20, n).astype(np.int32), PAIRS[0][1]) for n in range(1, 13) for _ in range(2)]
    written = np.concatenate(downstream.predict(model, pairs, IDS, fmt))
    ids = dataclasses.replace(IDS, eos=int(np.bincount(written[written >= 20]).argmax()))
    own = [(x, g) for (x, _), g in zip(pairs, downstream.predict(model, pairs, ids, fmt)) if len(g) < 5]
    assert len(own) >= 3
    assert downstream.evaluate(model, own, ids, fmt, batch_size=4) == {"exact_match": 1.0, "token_accuracy": 1.0}
    x, g = own[-1]
    changed = own[:-1] + [(x, np.concatenate([[ids.sep], g]).astype(np.int32))]
    scores = downstream.evaluate(model, changed, ids, fmt, batch_size=4)
    assert scores["exact_match"] == pytest.approx(1 - 1 / len(own))
    assert scores["token_accuracy"] < 1.0


@pytest.mark.parametrize("objective,family,args,mode,prefix_lm", [
    ("causal_lm", "decoder", {}, None, False),
    ("prefix_lm", "decoder", {}, None, True),
    ("span_corruption", "decoder", {"bidirectional_inputs": False}, None, False),
    ("span_corruption", "encoder_decoder", {}, None, False),
    ("ul2", "decoder", {}, "[S2S]", True),
    ("ul2", "encoder_decoder", {"max_length": 64}, "[S2S]", False),
    ("ul2", "decoder", {"mode_tokens": False}, None, True),
    ("mlm", "encoder", {}, None, False),
])
def test_each_cell_reads_the_task_as_it_pretrained(objective, family, args, mode, prefix_lm):
    """A mixture leads with its prefix-LM denoiser's mode token; a decoder reads a bidirectional prefix when
    its pretraining did."""
    cfg = base_config(objective=objective, **model_preset("gpt2", "tiny", family=family))
    for k, v in args.items():
        cfg.objective_args[k] = v
    ids = SpecialIds(cfg.model.vocab_size)
    fmt = compare.downstream_format(cfg, ids, family, compare.default_grid().yardsticks)
    assert fmt.mode == (None if mode is None else ids.mode(mode))
    assert fmt.prefix_lm == prefix_lm
