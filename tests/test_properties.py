"""Property-based tests (hypothesis) of the whole encoder-decoder over batch sizes, lengths (1 to 3000, not multiples of
anything), padding patterns, routes, routed fractions and k larger than the sequence.

What is invariant, and why. The routers rank the scores of a sample's real tokens (mask 1) only, take a number of
tokens that depends on the sample's real length only, and break ties by position; every attention sees real keys only
and biases them by the difference of ORIGINAL positions. Hence, in exact arithmetic:

- batch invariance: every row of a batch gives the same outputs as that row run alone with its mask, at every position,
  padding included (rows never interact);
- padding invariance: the outputs at real positions depend only on the real tokens and on their positions relative to
  each other. The ids at masked positions do not matter, and leading and trailing padding (left, right or both) can be
  cut away: cutting shifts every position alike.
- Holes (masked positions between real tokens) are NOT removable: they still count in the distances between the real
  tokens around them (local window, relative position bias), so closing a hole changes the outputs in general
  (`test_a_hole_keeps_the_original_positions`).
- A fully padded row has finite outputs (meaningless ones: nothing is real) and does not affect the other rows.

The properties are checked in float64, where rounding (about 1e-16) cannot flip a router's choice between two tokens;
in float32 a choice between two scores within rounding of each other can differ between batch shapes, a discontinuity
of hard top-k, not a bug.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colt5_hf import CoLT5Config, CoLT5ForConditionalGeneration
from colt5_hf.routing import ROUTER_TYPES


VOCAB = 64
PROPERTY_SETTINGS = settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


def small_config(**overrides):
    values = dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
        num_light_heads=2, num_heavy_heads=2, light_d_ff=32, heavy_d_ff=128, local_radius=7,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, router_iterations=10, dropout_rate=0.0,
    )
    return CoLT5Config(**{**values, **overrides})


FRACTIONS = st.sampled_from([1 / 16, 1 / 8, 0.3, 0.77, 1.0]) | st.floats(0.01, 1.0)


@st.composite
def configs(draw, long: bool):
    """Routed fractions, routes and min_routed_tokens. Long inputs route small fractions (everything routed would make
    the heavy attention an n x n one); short ones also try k far larger than the sequence."""
    routes = draw(st.sampled_from([4, 2, 1]))
    fraction = st.sampled_from([1 / 32, 1 / 16]) if long else FRACTIONS
    return small_config(
        attention_q_fraction=draw(fraction),
        attention_kv_fraction=draw(fraction),
        feed_forward_fraction=draw(fraction),
        min_routed_tokens=draw(st.sampled_from([4, 1] if long else [10_000, 4, 1])),
        local_radius=draw(st.sampled_from([1, 7, 15])),
        num_cross_attention_routes=routes,
        cross_attention_fraction=draw(st.sampled_from([1.0, 0.5, 0.1])),
        router_straight_through=draw(st.booleans()),
        router_type=draw(st.sampled_from(sorted(ROUTER_TYPES))),
    )


PADDINGS = ("none", "right", "left", "both", "holes", "empty")


@st.composite
def masks(draw, width: int):
    """One row's mask: unpadded, right/left/both-side padding, holes inside the real span, or fully padded."""
    kind = draw(st.sampled_from(PADDINGS))
    mask = torch.zeros(width, dtype=torch.long)
    if kind == "empty":
        return mask
    if kind == "none":
        return mask + 1
    start = 0 if kind == "right" else draw(st.integers(0, width - 1))
    end = width if kind == "left" else draw(st.integers(start + 1, width))
    mask[start:end] = 1
    if kind == "holes" and end - start > 2:
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        holes = torch.rand(end - start - 2, generator=generator) < draw(st.floats(0.05, 0.9))
        mask[start + 1 : end - 1][holes] = 0  # the span's ends stay real
    return mask


@st.composite
def cases(draw):
    long = draw(st.integers(0, 9)) == 0  # about one case in ten has a long row
    width = draw(st.integers(1000, 3000)) if long else draw(st.integers(1, 200))
    batch = 2 if long else draw(st.integers(2, 4))  # a row alone is the batch of one
    mask = torch.stack([draw(masks(width)) for _ in range(batch)])
    return draw(configs(long)), mask, draw(st.integers(1, 5)), draw(st.integers(0, 2**31 - 1))


def build(config, seed):
    torch.manual_seed(seed)
    return CoLT5ForConditionalGeneration(config).double().eval()


def run(model, input_ids, attention_mask, decoder_input_ids):
    outputs = model(input_ids, attention_mask, decoder_input_ids=decoder_input_ids)
    return outputs.encoder_last_hidden_state, outputs.logits


def assert_close(actual, expected, message):
    # the routers score and normalise in float32 even in a float64 model: soft weights differ in the 7th digit
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{message}: {m}")


@PROPERTY_SETTINGS
@given(cases())
@torch.no_grad()
def test_batch_and_padding_invariance(case):
    config, attention_mask, target_length, seed = case
    model = build(config, seed)
    generator = torch.Generator().manual_seed(seed)
    batch, width = attention_mask.shape
    input_ids = torch.randint(2, VOCAB, (batch, width), generator=generator)
    decoder_input_ids = torch.randint(2, VOCAB, (batch, target_length), generator=generator)

    encoded, logits = run(model, input_ids, attention_mask, decoder_input_ids)
    assert encoded.isfinite().all() and logits.isfinite().all()

    for i in range(batch):
        row = slice(i, i + 1)
        alone_encoded, alone_logits = run(model, input_ids[row], attention_mask[row], decoder_input_ids[row])
        assert_close(alone_encoded[0], encoded[i], f"row {i} alone, encoder")  # every position, padding included
        assert_close(alone_logits[0], logits[i], f"row {i} alone, logits")

        real = attention_mask[i].nonzero()[:, 0]
        if len(real) == 0:
            continue
        span = slice(real[0].item(), real[-1].item() + 1)  # cut the leading and trailing padding
        scrambled = torch.randint(2, VOCAB, (width,), generator=generator)  # other ids at every masked position
        trimmed_ids = torch.where(attention_mask[i].bool(), input_ids[i], scrambled)[span]
        trimmed_encoded, trimmed_logits = run(
            model, trimmed_ids[None], attention_mask[i, span][None], decoder_input_ids[row]
        )
        kept = attention_mask[i, span].bool()
        assert_close(trimmed_encoded[0, kept], encoded[i, span][kept], f"row {i} trimmed, encoder")
        assert_close(trimmed_logits[0], logits[i], f"row {i} trimmed, logits")


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3),
    width=st.integers(1, 300),
    mask_batch=st.integers(-1, 1),
    mask_width=st.integers(-3, 3),
)
@torch.no_grad()
def test_a_mask_of_another_shape_is_a_clear_error(batch, width, mask_batch, mask_width):
    model = build(small_config(), 0)
    input_ids = torch.randint(2, VOCAB, (batch, width))
    mask_shape = (batch + mask_batch, width + mask_width)
    decoder_input_ids = torch.randint(2, VOCAB, (batch, 3))
    if mask_shape == (batch, width) or min(mask_shape) < 0:
        return
    with pytest.raises(ValueError, match=rf"`attention_mask` has shape \({mask_shape[0]}, {mask_shape[1]}\)"):
        model(input_ids, torch.ones(mask_shape, dtype=torch.long), decoder_input_ids=decoder_input_ids)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(limit=st.integers(1, 200), width=st.integers(1, 260))
@torch.no_grad()
def test_inputs_longer_than_max_input_length_are_a_clear_error(limit, width):
    """`max_input_length` bounds the padded length: up to it the model runs, past it the error names both numbers."""
    model = build(small_config(max_input_length=limit), 0)
    input_ids = torch.randint(2, VOCAB, (2, width))
    if width <= limit:
        assert model.encoder(input_ids).last_hidden_state.shape == (2, width, 32)
        return
    with pytest.raises(ValueError, match=rf"input of {width} tokens .*`max_input_length` \({limit}\)"):
        model.encoder(input_ids)
    with pytest.raises(ValueError, match=rf"input of {width} tokens"):
        model.generate(input_ids=input_ids, max_new_tokens=2)


@torch.no_grad()
def test_a_hole_keeps_the_original_positions():
    """Closing a hole is not an invariance: the real tokens around it sit further apart with the hole than without."""
    model = build(small_config(local_radius=7), 0)
    input_ids = torch.randint(2, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(1, 40, dtype=torch.long)
    attention_mask[0, 15:19] = 0
    with_hole = model.encoder(input_ids, attention_mask).last_hidden_state[0, attention_mask[0].bool()]
    kept = attention_mask[0].bool()
    closed = model.encoder(input_ids[:, kept]).last_hidden_state[0]
    assert (with_hole - closed).abs().max() > 1e-2


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
@torch.no_grad()
def test_equal_hidden_states_tie_and_ties_go_to_the_earliest_positions(router_type):
    """Equal hidden states (a repeated token in the first layer) must score bitwise alike wherever they sit, or a padded
    sample and the sample alone break their ties differently. 2999 copies of one vector: every router takes the first
    k real positions of every row, whatever the row's padding (a matmul, rounding rows by their place in the batch,
    failed this)."""
    model = build(small_config(router_type=router_type, attention_q_fraction=0.1), 0)
    router = model.encoder.block[0].attention.q_router
    n = 2999
    hidden_states = torch.randn(32).expand(3, n, 32).contiguous()
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[1, :517] = False  # left padding
    mask[2, 2000:] = False  # right padding
    routing = router(hidden_states, mask)
    for i in range(3):
        first = mask[i].nonzero()[0, 0].item()
        k = routing.valid[i, 0].sum().item()
        assert k == model.config.routed_count(0.1, mask[i].sum().item())
        assert routing.indices[i, 0, :k].tolist() == list(range(first, first + k))
