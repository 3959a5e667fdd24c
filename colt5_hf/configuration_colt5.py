"""CoLT5 configuration."""

import copy
import difflib
import json
import math
from pathlib import Path

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

from .fast_path import ENCODER_COMPILE_MODES
from .routing import ROUTER_TYPES


logger = logging.get_logger(__name__)

# keyword arguments that are no CoLT5Config field but that Transformers passes or reads itself; any other is a mistake
# (a typo of a field, a field of another model) that the config keeps as an attribute and warns about
TRANSFORMERS_KWARGS = {"model_type", "auto_map", "name_or_path", "torch_dtype", "attn_implementation",
                       "experts_implementation", "output_attentions"}
# package data (colt5_hf/presets/*.json); configs/ in the repository holds the same files for reading
PRESET_FOLDER = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    """The presets shipped with the package: colt5-tiny, colt5-base, colt5-large, colt5-xl."""
    return sorted(path.stem for path in PRESET_FOLDER.glob("colt5-*.json"))  # beside them: denoisers-*.json


class CoLT5Config(PreTrainedConfig):
    r"""
    Configuration of a CoLT5 encoder-decoder (Ainslie et al. 2023): a T5.1.1/LongT5 model whose encoder layers run a
    light branch (local attention, narrow gated feed-forward) on every token and a heavy branch (full attention, wide
    gated feed-forward) on the tokens picked by learned routers.

    Shared with T5.1.1: `vocab_size`, `d_model`, `d_kv` (size of every attention head), `d_ff` (decoder feed-forward
    width), `num_layers`, `num_decoder_layers`, `num_heads` (decoder heads), `relative_attention_num_buckets`,
    `relative_attention_max_distance`, `dropout_rate`, `layer_norm_epsilon`, `initializer_factor`, `dense_act_fn`.

    Encoder (conditional computation):
        num_light_heads / num_heavy_heads: heads of the local and of the routed attention (default 1/4 and 3/4 of
            `num_heads`).
        light_d_ff / heavy_d_ff: widths of the light (all tokens) and heavy (routed tokens) feed-forward (default
            `d_ff // 2` and `4 * d_ff`).
        local_radius: each token attends to positions i - radius .. i + radius in the light attention.
        max_input_length: the longest input (padded length) the encoder accepts; longer inputs are an error. None: no
            limit but memory.
        attention_q_fraction / attention_kv_fraction / feed_forward_fraction: share of each sample's real (unpadded)
            tokens routed to heavy attention as queries, as keys/values, and to the heavy feed-forward.
        min_routed_tokens: every router takes at least this many tokens (all of them when a sample is shorter).
        router_type: the routers' soft top-k, which gives the routed tokens' weights (`CoLT5Router`); every type
            routes each sample's top-k tokens by score. "coor_descent" (the paper's coordinate descent: epsilon
            `router_epsilon`), "sinkhorn" (entropic optimal transport; Gumbel noise in training only) and
            "cum_softmax" (cumulative softmax); the last two divide the scores by `router_temperature`.
        router_iterations: iterations of coordinate descent and of Sinkhorn.
        router_fetch_ratio: coordinate descent and Sinkhorn solve for `router_fetch_ratio * k` tokens, then the routers
            keep the top k.
        router_straight_through: routed tokens are multiplied by exactly 1 in the forward pass, with the gradient of
            the soft scores; False: by the soft scores.
        router_one_sided_gradient: the routers learn only from the part of the gradient that asks for more of a routed
            token (its heavy output helped); the part that asks for less is dropped, so a token leaves the routed set
            only when others outscore it. Early in training the heavy branch's output is noise that hurts the tokens
            the loss depends on most, and the paper's two-sided gradient routes exactly those tokens out, where
            nothing brings them back: with the two-sided gradient no seed learned the long-range tasks of
            `colt5_hf.synthetic`, with this one five of five seeds learned two of them and three of five the third
            (docs/routing.md). False: the paper's two-sided gradient (what colt5-attention computes).
        router_one_sided_leak: share of the part that asks for less which the one-sided gradient keeps, in [0, 1): a
            routed token that never helps then sinks slowly and lets another in, where with 0 a first layer that routes
            a filler token (every occurrence alike) and none of the letters a task needs keeps it so.
        router_noise: scale of the logistic noise added to the router scores in training (eval is deterministic), so
            that a route also tries tokens outside its top k: a token that is never routed gets no gradient of its own.
            None: the router type's own (1 for "sinkhorn", 0 for the others, the paper's hard top-k).
        router_exploration: share of each route's tokens drawn in training uniformly at random from the tokens its
            scores did not pick (the rest are its top tokens by score; eval routes the top k). A token the scores
            rank out gets no gradient of its own, so without this a route never learns that it would help; unlike
            `router_noise`, the routes by score stay as they are. 0: the paper's hard top-k.
        heavy_output_init: the heavy branch's output projections (heavy attention `o`, heavy feed-forward `wo`) start
            at this multiple of their T5 initialisation when training from scratch; 0 starts the heavy branch at
            exactly zero, so that its routers get no gradient until it computes something useful.

    Decoder cross-attention:
        num_cross_attention_routes: R routes; the query heads are split evenly among them and each route attends to its
            own subset of encoder tokens.
        cross_attention_fraction: share of the encoder's real tokens each route sees (1.0 = all, no router).
        num_cross_attention_kv_heads: key/value heads per route (1 = multi-query attention, the paper's setting).

    Speed:
        encoder_compile: "auto" (on CUDA, inputs of 2048 tokens or more run the encoder blocks under torch.compile,
            padded to a length bucket: one compilation per bucket; CUDA graphs without gradients; the decoder blocks
            with them in forwards without a cache, one compilation per pair of buckets), "cuda_graphs" (CUDA graphs
            for training too, gradient accumulation included: the fastest) or "off" (eager). A choice of the running
            process, like `attn_implementation`: not saved. See `fast_path.py`.
    """

    model_type = "colt5"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    }

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    num_light_heads: int | None = None
    num_heavy_heads: int | None = None
    light_d_ff: int | None = None
    heavy_d_ff: int | None = None
    local_radius: int = 127
    max_input_length: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    attention_q_fraction: float = 1 / 16
    attention_kv_fraction: float = 1 / 8
    feed_forward_fraction: float = 1 / 16
    min_routed_tokens: int = 1
    router_type: str = "coor_descent"
    router_iterations: int = 50
    router_epsilon: float = 1.0
    router_fetch_ratio: float = 9 / 8
    router_temperature: float = 1.0
    router_straight_through: bool = True
    router_one_sided_gradient: bool = True
    router_one_sided_leak: float = 0.0
    router_noise: float | None = None
    router_exploration: float = 0.0
    heavy_output_init: float = 1.0
    num_cross_attention_routes: int = 1
    cross_attention_fraction: float = 1.0
    num_cross_attention_kv_heads: int = 1
    encoder_compile: str = "auto"
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    dense_act_fn: str = "gelu_new"
    is_encoder_decoder: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        unknown = sorted(key for key in kwargs if key not in TRANSFORMERS_KWARGS and not key.startswith("_"))
        for key in unknown:
            close = difflib.get_close_matches(key, self.__dataclass_fields__, n=1)
            logger.warning(f"CoLT5Config: `{key}` is not a CoLT5Config field"
                           + (f" (did you mean `{close[0]}`?)" if close else "")
                           + "; it is kept as an attribute, but no part of the model reads it")
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        given_heads = {name for name in ("num_light_heads", "num_heavy_heads") if getattr(self, name) is not None}
        if not given_heads:
            self.num_light_heads = max(1, self.num_heads // 4)
        for given, derived in (("num_heavy_heads", "num_light_heads"), ("num_light_heads", "num_heavy_heads")):
            value = getattr(self, given)
            if getattr(self, derived) is None and isinstance(value, int):
                # an error names a field the user set, never the one derived from it
                if given not in given_heads and not 0 < value < self.num_heads:
                    raise ValueError(f"CoLT5Config: `num_heads` ({self.num_heads}) must be at least 2: the encoder "
                                     "splits its heads between the light and the heavy attention")
                if not 0 < value < self.num_heads:
                    raise ValueError(f"CoLT5Config: `{given}` ({value}) must be between 1 and `num_heads` - 1 "
                                     f"({self.num_heads - 1}) when `{derived}` is not given: it gets the other heads")
                setattr(self, derived, self.num_heads - value)
        if self.light_d_ff is None:
            self.light_d_ff = self.d_ff // 2
        if self.heavy_d_ff is None:
            self.heavy_d_ff = 4 * self.d_ff
        super().__post_init__(**kwargs)
        self._check()

    def _check(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CoLT5Config: `{name}` must be a positive integer, got {value!r}")

        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "num_light_heads", "num_heavy_heads", "light_d_ff", "heavy_d_ff", "local_radius",
                     "relative_attention_num_buckets", "relative_attention_max_distance", "min_routed_tokens",
                     "router_iterations", "num_cross_attention_routes", "num_cross_attention_kv_heads"):
            positive(name)
        for name in ("attention_q_fraction", "attention_kv_fraction", "feed_forward_fraction",
                     "cross_attention_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
                raise ValueError(f"CoLT5Config: `{name}` must be a fraction in (0, 1], got {value!r}")
            setattr(self, name, float(value))  # the routers read an int as a count of tokens
        for name in ("router_epsilon", "router_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise ValueError(f"CoLT5Config: `{name}` must be a positive number, got {value!r}")
        if not (isinstance(self.heavy_output_init, (int, float)) and not isinstance(self.heavy_output_init, bool)
                and math.isfinite(self.heavy_output_init) and self.heavy_output_init >= 0):
            raise ValueError(f"CoLT5Config: `heavy_output_init` must be a number >= 0, got {self.heavy_output_init!r}")
        if self.router_noise is not None and not (
            isinstance(self.router_noise, (int, float)) and not isinstance(self.router_noise, bool)
            and math.isfinite(self.router_noise) and self.router_noise >= 0
        ):
            raise ValueError(f"CoLT5Config: `router_noise` must be None or a number >= 0, got {self.router_noise!r}")
        for name in ("router_exploration", "router_one_sided_leak"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
                raise ValueError(f"CoLT5Config: `{name}` must be a share in [0, 1), got {value!r}")
        if not (isinstance(self.router_fetch_ratio, (int, float)) and math.isfinite(self.router_fetch_ratio)
                and self.router_fetch_ratio >= 1):
            raise ValueError(f"CoLT5Config: `router_fetch_ratio` must be a finite number >= 1, got "
                             f"{self.router_fetch_ratio!r}")
        if self.encoder_compile not in ENCODER_COMPILE_MODES:
            raise ValueError(
                f"CoLT5Config: `encoder_compile` must be one of {ENCODER_COMPILE_MODES}, got {self.encoder_compile!r}"
            )
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"CoLT5Config: `router_type` must be one of {tuple(ROUTER_TYPES)}, got "
                             f"{self.router_type!r}")
        if not (isinstance(self.dropout_rate, (int, float)) and 0 <= self.dropout_rate < 1):
            raise ValueError(f"CoLT5Config: `dropout_rate` must be in [0, 1), got {self.dropout_rate!r}")
        for name in ("layer_norm_epsilon", "initializer_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"CoLT5Config: `{name}` must be a positive number, got {value!r}")
        for name in ("router_straight_through", "router_one_sided_gradient", "use_cache", "tie_word_embeddings",
                     "is_encoder_decoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CoLT5Config: `{name}` must be True or False, got {getattr(self, name)!r}")
        if self.dense_act_fn not in ACT2FN:
            raise ValueError(f"CoLT5Config: `dense_act_fn` must be an activation of ACT2FN, got {self.dense_act_fn!r}")
        if self.max_input_length is not None:
            positive("max_input_length")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            token_ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is not None and not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in token_ids
            ):
                raise ValueError(
                    f"CoLT5Config: `{name}` must be None or a token id in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        routes, kv_heads = self.num_cross_attention_routes, self.num_cross_attention_kv_heads
        if self.num_heads % routes:
            raise ValueError(
                f"CoLT5Config: `num_heads` ({self.num_heads}) must be divisible by `num_cross_attention_routes` "
                f"({routes}): the decoder's query heads are split evenly among the cross-attention routes"
            )
        if (self.num_heads // routes) % kv_heads:
            raise ValueError(
                f"CoLT5Config: the {self.num_heads // routes} query heads of each cross-attention route must be "
                f"divisible by `num_cross_attention_kv_heads` ({kv_heads})"
            )
        if self.relative_attention_num_buckets % 2 or self.relative_attention_num_buckets < 4:
            raise ValueError(
                "CoLT5Config: `relative_attention_num_buckets` must be even (bidirectional buckets) and at least 4, got "
                f"{self.relative_attention_num_buckets}"
            )
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            # T5's logarithmic buckets start at num_buckets // 2 in the decoder: a shorter max distance makes far
            # positions fall into negative buckets
            raise ValueError(
                f"CoLT5Config: `relative_attention_max_distance` ({self.relative_attention_max_distance}) must exceed "
                f"`relative_attention_num_buckets` // 2 ({self.relative_attention_num_buckets // 2})"
            )

    def validate(self):
        """Transformers' checks and CoLT5's: `save_pretrained` runs this first, so a value set after construction
        that the constructor would refuse is an error there, and no config that cannot be loaded is written."""
        super().validate()
        self._check()

    def to_dict(self):
        """As `PreTrainedConfig.to_dict`, without `encoder_compile`: how this process runs the encoder (like
        `attn_implementation`), not a property of the weights; a loaded model starts from the default."""
        values = super().to_dict()
        values.pop("encoder_compile", None)
        return values

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.validate()  # before Transformers copies this module into the folder: a refused save writes nothing
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CoLT5Config":
        """A preset shipped with the package, "tiny", "base", "large" or "xl" (also "colt5-large" ...), with
        `overrides` (config fields) applied: `CoLT5Config.from_preset("large", local_radius=255)`."""
        names = preset_names()
        preset = next((candidate for candidate in (name, f"colt5-{name}") if candidate in names), None)
        if preset is None:
            raise ValueError(f"CoLT5Config: no preset {name!r}; the presets are {', '.join(names) or 'missing'}")
        values = json.loads((PRESET_FOLDER / f"{preset}.json").read_text())
        values.pop("model_type")
        return cls(**{**values, **overrides})

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As `PreTrainedConfig.get_config_dict`, but a folder without config.json is an error: Transformers would
        build the default config, which silently loads weights of the same shapes with other settings."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not config_dict:
            raise OSError(f"CoLT5Config: found no config.json in {pretrained_model_name_or_path}")
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """As `PreTrainedConfig.from_dict` (which `from_pretrained` calls), with two checks: the config of another model
        type is an error (Transformers only warns, then builds a CoLT5 model that none of the weights fit), and values
        given as keyword arguments, which Transformers sets after construction, are validated too."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"CoLT5Config: the config is of model type {model_type!r}, not {cls.model_type!r}")
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result)._check()
        return result

    def get_text_config(self, decoder=None, encoder=None):
        """Transformers sizes the decoder's cache by `num_hidden_layers`, which (as in T5) names the encoder's
        `num_layers`: the decoder's view counts `num_decoder_layers` instead."""
        config = super().get_text_config(decoder=decoder, encoder=encoder)
        if decoder and not encoder and self.num_decoder_layers != self.num_layers:
            config = copy.copy(self) if config is self else config  # Transformers returns a copy here, but may not
            config.num_layers = self.num_decoder_layers
        return config

    def routed_count(self, fraction: float, length):
        """Tokens a router takes from a sample of `length` real tokens: ceil(fraction * length), at least
        `min_routed_tokens`, at most `length`. Works on ints and on integer tensors."""
        # both branches compute in float64, so an int length and a tensor length give the same count
        if isinstance(length, int):
            return min(length, max(self.min_routed_tokens, math.ceil(fraction * length - 1e-9)))
        k = (length.double() * fraction - 1e-9).ceil().long().clamp(min=self.min_routed_tokens)
        return k.minimum(length.long())


CoLT5Config.register_for_auto_class()  # Hub custom code: save_pretrained copies this file and maps AutoConfig to it


__all__ = ["CoLT5Config", "preset_names"]
