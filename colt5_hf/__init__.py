"""colt5-hf: CoLT5 (conditional long T5) as a Hugging Face Transformers model."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .configuration_colt5 import CoLT5Config
from .hub import LORA_TARGET_MODULES, push_to_hub, save_for_hub
from .modeling_colt5 import (
    CoLT5EncoderModel,
    CoLT5ForConditionalGeneration,
    CoLT5Model,
    CoLT5PreTrainedModel,
)
from .colt5_attention_api import (
    ConditionalRoutedAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedTransformerBlock,
)
from .routing import CoLT5Router, RouterOutput, coordinate_descent, cumulative_softmax, sinkhorn_top_k

AutoConfig.register("colt5", CoLT5Config, exist_ok=True)
AutoModel.register(CoLT5Config, CoLT5Model, exist_ok=True)
AutoModelForSeq2SeqLM.register(CoLT5Config, CoLT5ForConditionalGeneration, exist_ok=True)

__all__ = [
    "CoLT5Config",
    "CoLT5PreTrainedModel",
    "CoLT5Model",
    "CoLT5ForConditionalGeneration",
    "CoLT5EncoderModel",
    "LORA_TARGET_MODULES",
    "save_for_hub",
    "push_to_hub",
    "CoLT5Router",
    "RouterOutput",
    "coordinate_descent",
    "cumulative_softmax",
    "sinkhorn_top_k",
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedAttention",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedTransformerBlock",
]
