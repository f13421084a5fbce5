from pretrain.model.gpt import GPT, count_parameters, transformer_config

__all__ = ["GPT", "count_parameters", "transformer_config"]
