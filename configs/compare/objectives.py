"""The default objective comparison: eight (architecture, objective) cells, as in Raffel et al. 2020 (Table 2)
and Wang et al. 2022, at CPU scale. Every cell shares the same components (pre-norm LayerNorm, GELU MLP,
learned positions, d_model 256, 4 heads, vocabulary 8,192) and the same training FLOPs; decoders and the
encoder have 4 layers, the encoder-decoders 2 + 2 (about the same parameters).

    llmjax compare --grid configs/compare/objectives.py --workdir runs/compare
"""

from llmjax.compare import default_grid
from llmjax.presets import model_preset

# The components of GPT-2 (tiny) in every family.
DECODER = model_preset("gpt2", "tiny")
ENCODER = model_preset("gpt2", "tiny", family="encoder")
ENCODER_DECODER = model_preset("gpt2", "tiny", family="encoder_decoder", num_layers=2, num_decoder_layers=2)


def get_grid():
    g = default_grid()
    g.budget_flops = 6e12  # per cell: about 90 steps of the causal decoder at 16 x 128 tokens
    g.seeds = 3  # 8 cells x 3 seeds: about 40 minutes on a 2-core CPU
    g.train.update(batch_size=16, seq_length=128, log_every=5, eval_batches=8)
    g.optim.update(learning_rate=2e-3, warmup_steps=15, schedule="cosine")
    g.yardsticks.update(probe_steps=40)  # the probe saturates (0.9-0.96 for every cell at 60 steps)
    g.cells = [
        dict(name="causal_decoder.causal_lm", objective="causal_lm", model=DECODER),
        dict(name="prefix_decoder.prefix_lm", objective="prefix_lm", model=DECODER),
        dict(name="encoder_decoder.span_corruption", objective="span_corruption", model=ENCODER_DECODER),
        dict(name="encoder_decoder.prefix_lm", objective="prefix_lm", model=ENCODER_DECODER,
             objective_args=dict(max_length=64)),  # 64 tokens per side: about a 128-token document window
        dict(name="encoder.mlm", objective="mlm", model=ENCODER),
        dict(name="causal_decoder.span_corruption", objective="span_corruption", model=DECODER,
             objective_args=dict(bidirectional_inputs=False)),
        # UL2's mixture of denoisers with mode tokens: a decoder reads each example's inputs as a bidirectional
        # prefix; the encoder-decoder gets 64 tokens per side, as the prefix-LM cell
        dict(name="prefix_decoder.ul2", objective="ul2", model=DECODER),
        dict(name="encoder_decoder.ul2", objective="ul2", model=ENCODER_DECODER, objective_args=dict(max_length=64)),
    ]
    return g
