"""Prompt tuning of Uni-Perceiver-MoE on a fraction of a downstream set.

Importing this package registers the deep-prompt method with PEFT (so `PeftModel.from_pretrained` can load
our adapters).
"""

from .adapter import DeepPromptConfig, DeepPromptModel, register_with_peft

__all__ = ["DeepPromptConfig", "DeepPromptModel", "register_with_peft"]
