"""Bad configurations and bad checkpoint folders: every invalid config value is an error naming its field; truncated or
corrupt weights, missing weights, missing or foreign configs are clear errors that change nothing on disk; weights are
read from safetensors only, never through pickle."""

import hashlib
import json
import shutil

import pytest
from huggingface_hub.errors import StrictDataclassError
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM, T5Config

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration, CoLT5Model
from tiny import tiny_values




# ------------------------------------------------------------------------------------------------ invalid configs

POSITIVE_INTEGERS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "num_light_heads",
    "num_heavy_heads", "light_d_ff", "heavy_d_ff", "local_radius", "min_routed_tokens", "router_iterations",
    "relative_attention_num_buckets", "relative_attention_max_distance", "num_cross_attention_routes",
    "num_cross_attention_kv_heads", "max_input_length",
)
FRACTIONS = ("attention_q_fraction", "attention_kv_fraction", "feed_forward_fraction", "cross_attention_fraction")
POSITIVE_NUMBERS = ("router_epsilon", "router_temperature", "layer_norm_epsilon", "initializer_factor")
BOOLEANS = ("router_straight_through", "router_one_sided_gradient", "use_cache", "tie_word_embeddings")
TOKEN_IDS = ("pad_token_id", "eos_token_id", "decoder_start_token_id")

# field -> invalid values, each an error whose message names the field (the tiny preset: vocab 384, 4 decoder heads)
INVALID_VALUES = {
    **{name: [0, -3, 2.5, True, "8"] for name in POSITIVE_INTEGERS},
    **{name: [0, 0.0, -0.25, 1.5, float("nan"), "0.5", None] for name in FRACTIONS},
    **{name: [0, -1.0, float("inf"), float("nan"), "1", None] for name in POSITIVE_NUMBERS},
    **{name: [1, "yes", None] for name in BOOLEANS},
    **{name: [-1, 384, 2.0, True, "1"] for name in TOKEN_IDS},
    "num_light_heads": [0, -1, 1.0],
    "num_heavy_heads": [0, -1, 1.0],
    "relative_attention_num_buckets": [0, 2, 7, 1.5],  # even and at least 4
    "relative_attention_max_distance": [0, 8, 16],  # must exceed num_buckets // 2 = 16
    "num_cross_attention_routes": [0, 3, 8],  # must divide num_heads = 4
    "num_cross_attention_kv_heads": [0, 3, 4],  # must divide the 2 query heads of each of 2 routes (set below)
    "eos_token_id": [-1, 384, [1, 384], "1"],
    "router_type": ["top_k", "", None],
    "router_fetch_ratio": [0.5, 0, float("nan"), float("inf"), "2"],
    "router_noise": [-0.5, float("nan"), float("inf"), "1", True],
    "router_exploration": [-0.1, 1.0, float("nan"), "0.1", None, True],
    "router_one_sided_leak": [-0.1, 1.0, float("nan"), "0.1", None, True],
    "heavy_output_init": [-1.0, float("nan"), float("inf"), "0", None, True],
    "dropout_rate": [-0.1, 1.0, "0.1", None],
    "dense_act_fn": ["no_such_activation", None],
    "is_encoder_decoder": [1, None],  # False is valid: an encoder model's config
    "encoder_compile": ["always", "", None, True],
}
CONTEXT = {"num_cross_attention_kv_heads": dict(num_cross_attention_routes=2)}
FIELDS = list(CoLT5Config.__annotations__)


def test_every_config_field_has_invalid_values():
    """A new field must come with its validation and its cases here."""
    assert set(FIELDS) <= set(INVALID_VALUES), set(FIELDS) - set(INVALID_VALUES)


@pytest.mark.parametrize(
    "name, value", [(name, value) for name in FIELDS for value in INVALID_VALUES.get(name, [])], ids=repr
)
def test_invalid_config_value_is_an_error_naming_the_field(name, value):
    # Transformers 5.17 type-checks its own fields (is_encoder_decoder, ...) first, with huggingface_hub's error
    with pytest.raises((ValueError, StrictDataclassError), match=f"[`']{name}[`']"):
        CoLT5Config(**{**tiny_values(), **CONTEXT.get(name, {}), name: value})


def test_the_tiny_preset_and_the_defaults_are_valid():
    CoLT5Config(**tiny_values())
    CoLT5Config()


@pytest.mark.parametrize("name, value", [("attention_q_fraction", 2.0), ("dense_act_fn", "swishy"), ("pad_token_id", 999)])
def test_invalid_values_from_config_json_and_from_keyword_overrides(name, value, tmp_path):
    """config.json goes through the same checks as the constructor; so do keyword overrides of from_pretrained, which
    Transformers sets on the built config."""
    CoLT5Config(**tiny_values()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"`{name}`"):
        CoLT5Config.from_pretrained(tmp_path, **{name: value})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, name: value}))
    with pytest.raises(ValueError, match=f"`{name}`"):
        CoLT5Config.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------- bad folders


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    model = CoLT5ForConditionalGeneration(CoLT5Config(**tiny_values())).eval()
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def folder(saved_model, tmp_path):
    """A fresh copy of the saved checkpoint folder."""
    copy = tmp_path / "checkpoint"
    shutil.copytree(saved_model[1], copy)
    return copy


def snapshot(folder):
    """Every file and folder under `folder`: name, size, modification time and content hash."""
    return {
        str(path.relative_to(folder)): (path.is_dir(), path.stat().st_mtime_ns)
        + ((path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()) if path.is_file() else ())
        for path in sorted(folder.rglob("*"))
    }


def assert_load_fails(folder, error, match, load=CoLT5ForConditionalGeneration.from_pretrained, **kwargs):
    before = snapshot(folder)
    with pytest.raises(error, match=match):
        load(folder, **kwargs)
    assert snapshot(folder) == before


def weights_file(folder):
    return folder / "model.safetensors"


def header_length(path):
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("cut", ["empty", "in-length-field", "in-header", "after-header", "in-data", "one-byte-short"])
def test_truncated_weights_are_a_clear_error(folder, cut):
    path = weights_file(folder)
    data = path.read_bytes()
    header_end = 8 + header_length(path)
    keep = {
        "empty": 0, "in-length-field": 5, "in-header": header_end // 2, "after-header": header_end,
        "in-data": (header_end + len(data)) // 2, "one-byte-short": len(data) - 1,
    }[cut]
    path.write_bytes(data[:keep])
    assert_load_fails(folder, OSError, f"safetensors weights of {folder} are truncated or corrupt")


@pytest.mark.parametrize("damage", ["garbage-header", "huge-header-length", "header-not-json", "trailing-bytes"])
def test_corrupt_weights_are_a_clear_error(folder, damage):
    path = weights_file(folder)
    data = bytearray(path.read_bytes())
    if damage == "garbage-header":
        data[8:40] = b"\xff" * 32
    elif damage == "huge-header-length":
        data[:8] = (2**60).to_bytes(8, "little")
    elif damage == "header-not-json":
        data[8:12] = b"}}}}"
    else:
        data += b"\x00" * 3
    path.write_bytes(bytes(data))
    assert_load_fails(folder, OSError, "truncated or corrupt")


def test_missing_weights_are_an_error_naming_them(folder):
    """Transformers only warns and initialises a missing weight at random; a checkpoint that holds a part (here the
    encoder) but lacks some of its weights is an error that names them."""
    state = load_file(weights_file(folder))
    missing = ["encoder.block.1.feed_forward.router.weight", "encoder.final_layer_norm.weight"]
    for name in missing:
        del state[name]
    save_file(state, str(weights_file(folder)), metadata={"format": "pt"})
    assert_load_fails(folder, OSError, rf"lacks 2 weights.*{missing[0]}, {missing[1]}")
    assert_load_fails(folder, OSError, "lacks 2 weights", load=AutoModelForSeq2SeqLM.from_pretrained)


def test_a_part_absent_altogether_is_initialised(saved_model, tmp_path):
    """The usual base-to-head loading still works: a CoLT5Model checkpoint (no LM head at all) loads into
    CoLT5ForConditionalGeneration with every encoder/decoder weight from the file and a fresh LM head."""
    model = saved_model[0]
    base = CoLT5Model(model.config)
    base.load_state_dict({name: tensor for name, tensor in model.state_dict().items() if name != "lm_head.weight"})
    base.save_pretrained(tmp_path)
    loaded, loading_info = CoLT5ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert loading_info["missing_keys"] == {"lm_head.weight"}
    for name, tensor in base.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_wrong_shapes_are_an_error(folder):
    state = load_file(weights_file(folder))
    state["encoder.block.0.attention.q_router.weight"] = torch.zeros(2, 64)
    save_file(state, str(weights_file(folder)), metadata={"format": "pt"})
    assert_load_fails(folder, RuntimeError, "ignore_mismatched_sizes")


def test_missing_config_is_an_error(folder):
    """Transformers would build the default config (d_model 512 ...) and load any weights of matching shapes into it."""
    (folder / "config.json").unlink()
    assert_load_fails(folder, OSError, "no config.json")
    assert_load_fails(folder, OSError, "no config.json", load=CoLT5Config.from_pretrained)


def test_corrupt_config_is_an_error(folder):
    config = folder / "config.json"
    config.write_text(config.read_text()[:40])
    assert_load_fails(folder, OSError, "not a valid JSON file")


def test_config_of_another_model_type_is_an_error(folder):
    """Transformers only warns, then builds a CoLT5 model from T5's values that none of the weights fit."""
    (folder / "config.json").unlink()
    T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4).save_pretrained(folder)
    assert_load_fails(folder, ValueError, "model type 't5', not 'colt5'")
    assert_load_fails(folder, ValueError, "model type 't5'", load=CoLT5Config.from_pretrained)


@pytest.fixture
def sharded_folder(saved_model, tmp_path):
    folder = tmp_path / "sharded"
    saved_model[0].save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_damaged_shards_are_clear_errors(sharded_folder):
    shards = sorted(sharded_folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    assert_load_fails(sharded_folder, OSError, "truncated or corrupt")
    shards[1].write_bytes(data)
    shards[2].unlink()
    assert_load_fails(sharded_folder, FileNotFoundError, shards[2].name)
    index = sharded_folder / "model.safetensors.index.json"
    index.write_text(index.read_text()[:30])
    assert_load_fails(sharded_folder, OSError, "truncated or corrupt")


# ------------------------------------------------------------------------------------------------- no pickle path


@pytest.fixture
def no_pickle(monkeypatch):
    """torch.load is the pickle path of Transformers' loaders: make any call to it fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", refuse)


def test_a_folder_with_only_pytorch_model_bin_is_not_loaded(saved_model, tmp_path, no_pickle):
    model, folder = saved_model
    shutil.copy(folder / "config.json", tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as file:
        torch.save(model.state_dict(), file)
    assert_load_fails(tmp_path, OSError, "no file named model.safetensors")
    assert_load_fails(tmp_path, OSError, "no file named model.safetensors", load=AutoModelForSeq2SeqLM.from_pretrained)
    assert_load_fails(tmp_path, ValueError, "safetensors files only", use_safetensors=False)
    assert_load_fails(tmp_path, ValueError, "safetensors files only", gguf_file="model.gguf")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="safetensors files only"):
        CoLT5ForConditionalGeneration.from_pretrained(tmp_path / "pytorch_model.bin", config=tmp_path)
    assert snapshot(tmp_path) == before


def test_safetensors_win_over_a_pickle_next_to_them(saved_model, folder, no_pickle):
    """A pytorch_model.bin beside model.safetensors (here one that would load other weights) is never opened."""
    model = saved_model[0]
    with open(folder / "pytorch_model.bin", "wb") as file:
        torch.save({name: torch.zeros_like(tensor) for name, tensor in model.state_dict().items()}, file)
    before = snapshot(folder)
    loaded = CoLT5ForConditionalGeneration.from_pretrained(folder)
    assert snapshot(folder) == before
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
