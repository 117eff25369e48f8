"""llmjax: pretrain BERT-, GPT- and T5-style transformers in JAX / Flax NNX.

Importing llmjax changes nothing in the process: the command line (llmjax.cli) applies the process-wide settings
of llmjax.runtime before JAX starts; call llmjax.runtime.prepare_process() yourself for the same effect.
"""
