"""Uni-Perceiver-MoE for transformers. Importing this package registers the classes with the Auto* factories."""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_uniperceiver_moe import (
    MOE_ROUTINGS,
    REFERENCE_INIT,
    REFERENCE_LABEL_SMOOTHING,
    SIZE_PRESETS,
    UniPerceiverMoEConfig,
)
from .modeling_uniperceiver_moe import (
    GenericPerceptionOutput,
    UniPerceiverMoEForGenericPerception,
    UniPerceiverMoELinear,
    UniPerceiverMoEModel,
    UniPerceiverMoEModelOutput,
    UniPerceiverMoEPreTrainedModel,
    caption_attention_pattern,
)
from .processing_uniperceiver_moe import UniPerceiverMoEProcessor
from .reparameterization import fold_experts
from .routing import TokenAttributes
from .tokenization_uniperceiver_moe import build_uniperceiver_tokenizer

AutoConfig.register(UniPerceiverMoEConfig.model_type, UniPerceiverMoEConfig, exist_ok=True)
AutoModel.register(UniPerceiverMoEConfig, UniPerceiverMoEModel, exist_ok=True)
AutoProcessor.register(UniPerceiverMoEConfig, UniPerceiverMoEProcessor, exist_ok=True)
# save_pretrained then writes an `auto_map` and copies the code files beside the weights, so a checkpoint
# loads with `trust_remote_code=True` where this package is not installed (AutoModelForPreTraining: the head).
UniPerceiverMoEConfig.register_for_auto_class()
UniPerceiverMoEModel.register_for_auto_class("AutoModel")
UniPerceiverMoEForGenericPerception.register_for_auto_class("AutoModelForPreTraining")
UniPerceiverMoEProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "UniPerceiverMoEConfig",
    "UniPerceiverMoEModel",
    "UniPerceiverMoEForGenericPerception",
    "UniPerceiverMoEPreTrainedModel",
    "UniPerceiverMoELinear",
    "UniPerceiverMoEModelOutput",
    "GenericPerceptionOutput",
    "UniPerceiverMoEProcessor",
    "TokenAttributes",
    "build_uniperceiver_tokenizer",
    "caption_attention_pattern",
    "fold_experts",
    "MOE_ROUTINGS",
    "SIZE_PRESETS",
    "REFERENCE_INIT",
    "REFERENCE_LABEL_SMOOTHING",
]
