"""Hugging Face transformers interop: import GPT-2, BERT, T5, Llama and Mixtral weights into llmjax and export
them back.

    cfg, model = from_hf(hf_model)  # GPT2LMHeadModel, BertForPreTraining, T5ForConditionalGeneration,
                                    # LlamaForCausalLM, MixtralForCausalLM
    hf_model = to_hf(model)         # the same weights in the matching transformers class

Per family (llmjax.interop.gpt2 / bert / t5 / llama / mixtral): config_from_hf, hf_config_from, params_from_hf, params_to_hf.
"""

from llmjax.interop.hf import InteropError, from_hf, load_params, to_hf

__all__ = ["InteropError", "from_hf", "load_params", "to_hf"]
