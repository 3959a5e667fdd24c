"""Build a CoLT5 model from a pretrained T5.1.1 / FLAN-T5 / mT5 / LongT5 (local attention) checkpoint.

Every encoder layer's attention heads are partitioned between the light (local) and the heavy (routed) attention: the
first `num_light_heads` source heads become the light heads, the others the heavy heads, and the columns of T5's
relative position bias table follow them (CoLT5 keeps one table of light + heavy heads). The encoder feed-forward's
hidden units are split likewise: the first `light_d_ff` units become the light feed-forward, the rest the first units
of the heavy feed-forward, whose remaining units start with zero output weights (they add nothing until trained). The
decoder is copied as is, except that the cross-attention's key/value heads are mean-pooled into the configured key/value
heads of each route (the GQA uptraining recipe of Ainslie et al. 2023). With every token routed, a radius covering the
input and as many key/value heads as query heads, the converted model computes the source model's logits.
"""

from pathlib import Path

import torch

from .configuration_colt5 import CoLT5Config
from .modeling_colt5 import CoLT5ForConditionalGeneration


SOURCE_MODEL_TYPES = ("t5", "mt5", "longt5")


def source_scales_decoder_outputs(source_config):
    # Transformers >= 5.2x records T5's d_model**-0.5 output scaling in `scale_decoder_outputs`; earlier versions in
    # `tie_word_embeddings`
    return getattr(source_config, "scale_decoder_outputs", source_config.tie_word_embeddings)


def colt5_config_from_source(source_config, **overrides) -> CoLT5Config:
    """The CoLT5 config of a converted model: the source's T5 sizes, CoLT5's defaults for the routed branches (1/4 of
    the heads light, half of d_ff light, 4 * d_ff heavy, multi-query cross-attention), then `overrides`."""
    model_type = source_config.model_type
    if model_type not in SOURCE_MODEL_TYPES:
        raise ValueError(
            f"cannot convert a {model_type!r} model: conversion reads T5.1.1, FLAN-T5, mT5 and LongT5 checkpoints "
            f"(model_type one of {SOURCE_MODEL_TYPES})"
        )
    if not source_config.is_gated_act:
        raise ValueError(
            f"cannot convert a model with feed_forward_proj={source_config.feed_forward_proj!r}: CoLT5 uses T5.1.1's "
            "gated feed-forward (feed_forward_proj='gated-gelu'), so the original T5 (v1.0, ReLU) does not map onto it"
        )
    values = {
        name: getattr(source_config, name)
        for name in (
            "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
            "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
            "layer_norm_epsilon", "initializer_factor", "dense_act_fn", "pad_token_id", "eos_token_id",
            "decoder_start_token_id",
        )
    }
    if model_type == "longt5":
        if source_config.encoder_attention_type != "local":
            raise ValueError(
                f"cannot convert a LongT5 model with encoder_attention_type={source_config.encoder_attention_type!r}: "
                "only LongT5 with local attention maps onto CoLT5 (transient-global attention has extra weights)"
            )
        values["local_radius"] = source_config.local_radius
    values["tie_word_embeddings"] = bool(source_scales_decoder_outputs(source_config))
    values.update(overrides)
    config = CoLT5Config(**values)
    check_partition(config, source_config)
    return config


def check_partition(config: CoLT5Config, source_config):
    for name in ("d_model", "d_kv", "num_heads", "vocab_size", "num_layers", "num_decoder_layers",
                 "relative_attention_num_buckets"):
        if getattr(config, name) != getattr(source_config, name):
            raise ValueError(
                f"`{name}` must stay {getattr(source_config, name)} (the source model's) to convert, "
                f"got {getattr(config, name)}"
            )
    if config.num_light_heads + config.num_heavy_heads != source_config.num_heads:
        raise ValueError(
            f"num_light_heads ({config.num_light_heads}) + num_heavy_heads ({config.num_heavy_heads}) must equal the "
            f"source model's {source_config.num_heads} encoder heads: conversion partitions them"
        )
    if not 0 < config.light_d_ff <= source_config.d_ff:
        raise ValueError(f"light_d_ff ({config.light_d_ff}) must be at most the source model's d_ff "
                         f"({source_config.d_ff}): the light feed-forward takes its first units")
    if config.heavy_d_ff < source_config.d_ff - config.light_d_ff:
        raise ValueError(
            f"heavy_d_ff ({config.heavy_d_ff}) must hold the {source_config.d_ff - config.light_d_ff} units of the "
            f"source feed-forward that light_d_ff ({config.light_d_ff}) leaves over"
        )


@torch.no_grad()
def convert_t5_to_colt5(source, config: CoLT5Config) -> CoLT5ForConditionalGeneration:
    """A CoLT5ForConditionalGeneration holding the weights of `source` (a transformers T5/MT5/LongT5
    ForConditionalGeneration) partitioned as the module docstring says; routers keep their fresh initialisation."""
    check_partition(config, source.config)
    model = CoLT5ForConditionalGeneration(config).to(source.dtype)
    weights = source.state_dict()
    light_heads, d_kv = config.num_light_heads, config.d_kv
    light_inner, light_ff = light_heads * d_kv, config.light_d_ff

    def copy(target, name):
        target.copy_(weights[name])

    model.encoder.embed_tokens.weight.copy_(source.get_input_embeddings().weight)
    if config.tie_word_embeddings:
        if source.lm_head.weight.data_ptr() != source.get_input_embeddings().weight.data_ptr():
            raise ValueError("the source model scales its decoder outputs but its lm_head is not tied to the "
                             "embeddings: convert with tie_word_embeddings=False (folds the scale into the head)")
    else:
        head = source.lm_head.weight
        if source_scales_decoder_outputs(source.config):
            head = head * config.d_model**-0.5
        model.lm_head.weight.copy_(head)

    attention_name = "LocalSelfAttention" if source.config.model_type == "longt5" else "SelfAttention"
    copy(model.encoder.relative_attention_bias.weight,
         f"encoder.block.0.layer.0.{attention_name}.relative_attention_bias.weight")
    for i, block in enumerate(model.encoder.block):
        prefix = f"encoder.block.{i}.layer."
        attention = f"{prefix}0.{attention_name}."
        light, heavy = block.attention.light_attention, block.attention.heavy_attention
        for proj in ("q", "k", "v"):  # rows are heads x d_kv
            source_weight = weights[attention + proj + ".weight"]
            getattr(light, proj).weight.copy_(source_weight[:light_inner])
            getattr(heavy, proj).weight.copy_(source_weight[light_inner:])
        light.o.weight.copy_(weights[attention + "o.weight"][:, :light_inner])
        heavy.o.weight.copy_(weights[attention + "o.weight"][:, light_inner:])
        copy(block.attention_layer_norm.weight, prefix + "0.layer_norm.weight")

        feed_forward = prefix + "1.DenseReluDense."
        light_ff_module, heavy_ff_module = block.feed_forward.light_feed_forward, block.feed_forward.heavy_feed_forward
        rest = weights[feed_forward + "wo.weight"].shape[1] - light_ff
        for proj in ("wi_0", "wi_1"):
            source_weight = weights[feed_forward + proj + ".weight"]  # (d_ff, d_model)
            getattr(light_ff_module, proj).weight.copy_(source_weight[:light_ff])
            # extra heavy units keep their random input weights, so they learn once their output weights move
            getattr(heavy_ff_module, proj).weight[:rest].copy_(source_weight[light_ff:])
        light_ff_module.wo.weight.copy_(weights[feed_forward + "wo.weight"][:, :light_ff])
        heavy_ff_module.wo.weight.zero_()
        heavy_ff_module.wo.weight[:, :rest].copy_(weights[feed_forward + "wo.weight"][:, light_ff:])
        copy(block.feed_forward_layer_norm.weight, prefix + "1.layer_norm.weight")
    copy(model.encoder.final_layer_norm.weight, "encoder.final_layer_norm.weight")

    copy(model.decoder.relative_attention_bias.weight, "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    kv_heads = config.num_cross_attention_routes * config.num_cross_attention_kv_heads
    for i, block in enumerate(model.decoder.block):
        prefix = f"decoder.block.{i}.layer."
        for proj in ("q", "k", "v", "o"):
            copy(getattr(block.self_attention, proj).weight, f"{prefix}0.SelfAttention.{proj}.weight")
        copy(block.self_attention_layer_norm.weight, prefix + "0.layer_norm.weight")
        for proj in ("q", "o"):
            copy(getattr(block.cross_attention, proj).weight, f"{prefix}1.EncDecAttention.{proj}.weight")
        for proj in ("k", "v"):
            # query head h reads key/value head h // group: pool the source heads of each group
            source_weight = weights[f"{prefix}1.EncDecAttention.{proj}.weight"]  # (heads * d_kv, d_model)
            pooled = source_weight.view(kv_heads, -1, d_kv, config.d_model).mean(1)
            getattr(block.cross_attention, proj).weight.copy_(pooled.reshape(kv_heads * d_kv, config.d_model))
        copy(block.cross_attention_layer_norm.weight, prefix + "1.layer_norm.weight")
        for proj in ("wi_0", "wi_1", "wo"):
            copy(getattr(block.feed_forward, proj).weight, f"{prefix}2.DenseReluDense.{proj}.weight")
        copy(block.feed_forward_layer_norm.weight, prefix + "2.layer_norm.weight")
    copy(model.decoder.final_layer_norm.weight, "decoder.final_layer_norm.weight")
    return model


PICKLE_REFUSED = ("which can run code when loaded: conversion reads safetensors weights only, unless you trust the "
                  "file and pass allow_pickle=True (colt5-hf convert --allow-pickle)")


def convert_checkpoint(path, dtype=torch.float32, allow_pickle: bool = False, **overrides
                       ) -> CoLT5ForConditionalGeneration:
    """Load a T5/mT5/LongT5 checkpoint folder (or Hub id) with transformers and convert it. Weights are read from
    safetensors files only, as CoLT5's `from_pretrained` does; `allow_pickle=True` also reads `pytorch_model.bin`
    (torch's restricted unpickler)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    source_config = AutoConfig.from_pretrained(path)
    config = colt5_config_from_source(source_config, **overrides)
    folder = Path(path)
    if not allow_pickle and folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(file.name for file in folder.iterdir() if file.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ValueError(f"{path} holds its weights only as a pickle ({', '.join(pickles)}), {PICKLE_REFUSED}")
    try:
        source = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype,
                                                       use_safetensors=None if allow_pickle else True)
    except OSError as error:
        if allow_pickle or "safetensors" not in str(error):
            raise
        raise OSError(f"{error} A checkpoint may hold its weights as a pickle instead, {PICKLE_REFUSED}") from error
    return convert_t5_to_colt5(source, config)


__all__ = ["colt5_config_from_source", "convert_t5_to_colt5", "convert_checkpoint"]
