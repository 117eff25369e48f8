"""A 2-cell grid small enough for the test suite (tiny models, a small slice of the corpus).

    llmjax compare --grid configs/compare/micro.py --workdir runs/compare_micro
"""

from llmjax.compare import default_grid
from llmjax.presets import model_preset

# GPT-2 components at a smaller shape; each cell sets its family and number of layers.
SHARED = model_preset("gpt2", "tiny", vocab_size=1000, d_model=64, mlp_dim=128, max_length=128)


def get_grid():
    g = default_grid()
    g.budget_flops = 1e10
    g.data.update(max_documents=300, vocab_size=1000)
    g.train.update(batch_size=8, seq_length=64, log_every=2, eval_batches=2)
    g.optim.update(learning_rate=3e-3, warmup_steps=3)
    g.yardsticks.update(window_length=48, eval_windows=32, eval_batch_size=16, lm_adapt_steps=4,
                        probe_length=16, probe_train_examples=64, probe_eval_examples=32, probe_steps=4,
                        probe_batch_size=16, downstream_steps=4, downstream_batch_size=16, downstream_input_length=16,
                        downstream_eval_examples=32)
    g.cells = [
        dict(name="decoder.causal_lm", objective="causal_lm", model=dict(SHARED, family="decoder", num_layers=2)),
        dict(name="encoder_decoder.span_corruption", objective="span_corruption",
             model=dict(SHARED, family="encoder_decoder", num_layers=1, num_decoder_layers=1)),
    ]
    return g
