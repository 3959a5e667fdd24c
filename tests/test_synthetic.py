"""The long-range synthetic tasks (colt5_hf/synthetic.py): answers checked by parsing the text independently, the
spacing that keeps local attention blind to the relations, determinism, and the calibration of the shortcuts."""

import re

import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer

from colt5_hf import CoLT5Config, synthetic
from colt5_hf.synthetic import TASKS, TINY, Geometry


def parse(source):
    """The items of a source text: {position: character} for every character that is not filler."""
    return {i: c for i, c in enumerate(source) if not ("a" <= c <= "z" or c == ".")}


def check_spacing(positions, length, gap):
    """Every item character at least `gap` from both ends (position 0 and the end-of-sequence token at length - 1),
    and items (runs of adjacent characters) at least `gap` apart."""
    assert min(positions) >= gap and max(positions) <= length - 2 - gap
    starts = [p for p in positions if p - 1 not in positions]
    ends = [p for p in positions if p + 1 not in positions]
    for end, start in zip(ends[:-1], starts[1:]):
        assert start - end >= gap


@pytest.mark.parametrize("length", [512, 2048])
def test_order_answers_the_first_letter(length):
    for example in synthetic.examples("order", 64, seed=3, length=length):
        source = example["source"]
        assert len(source) == length - 1
        items = parse(source)
        assert len(items) == 2 and len(set(items.values())) == 2 and set(items.values()) <= set(synthetic.LETTERS)
        check_spacing(items, length, TINY.gap)
        assert example["target"] == items[min(items)]


@pytest.mark.parametrize("length", [512, 2048])
def test_nearest_answers_the_letter_nearer_the_anchor_at_distances_the_buckets_tell_apart(length):
    for example in synthetic.examples("nearest", 64, seed=4, length=length):
        items = parse(example["source"])
        (anchor,) = [p for p, c in items.items() if c == "#"]
        letters = {c: abs(p - anchor) for p, c in items.items() if c != "#"}
        assert len(letters) == 2
        check_spacing(items, length, TINY.gap)
        near, far = sorted(letters.values())
        assert TINY.gap <= near <= TINY.near_max and far >= TINY.far_min
        assert example["target"] == min(letters, key=letters.get)


@pytest.mark.parametrize("length", [512, 2048])
def test_chain_answers_the_letter_nearest_the_letter_nearest_the_anchor(length):
    for example in synthetic.examples("chain", 64, seed=6, length=length):
        items = parse(example["source"])
        (anchor,) = [p for p, c in items.items() if c == "#"]
        letters = {p: c for p, c in items.items() if c != "#"}
        assert len(set(letters.values())) == 3
        check_spacing(items, length, TINY.gap)
        first = min(letters, key=lambda p: abs(p - anchor))
        second = min((p for p in letters if p != first), key=lambda p: abs(p - first))
        other = next(p for p in letters if p not in (first, second))
        assert TINY.gap <= abs(first - anchor) <= TINY.near_max and TINY.gap <= abs(second - first) <= TINY.near_max
        assert (second - first) * (first - anchor) > 0  # B lies beyond A, seen from the anchor
        assert min(abs(other - p) for p in (anchor, first, second)) >= TINY.far_min
        assert example["target"] == letters[second]


@pytest.mark.parametrize("length", [512, 2048])
def test_hops_answers_the_value_of_the_querys_value(length):
    for example in synthetic.examples("hops", 64, seed=5, length=length):
        source = example["source"]
        pairs = dict(re.findall(r"([A-Z])>([A-Z])", source))
        (query,) = re.findall(r"\?([A-Z])", source)
        assert len(pairs) == synthetic.HOPS_PAIRS and query in pairs and pairs[query] in pairs
        assert len({query, pairs[query], pairs[pairs[query]]}) == 3
        check_spacing(parse(source), length, TINY.gap)
        assert example["target"] == pairs[pairs[query]]


@pytest.mark.parametrize("task", TASKS)
def test_generation_is_deterministic_per_seed_and_step(task):
    first = synthetic.generate(task, 8, seed=1, length=512)
    again = synthetic.generate(task, 8, seed=1, length=512)
    other = synthetic.generate(task, 8, seed=2, length=512)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.input_ids, other.input_ids)
    step = synthetic.batch(task, 8, seed=1, step=7, length=512)
    assert torch.equal(step.input_ids, synthetic.batch(task, 8, seed=1, step=7, length=512).input_ids)
    assert not torch.equal(step.input_ids, synthetic.batch(task, 8, seed=1, step=8, length=512).input_ids)
    assert not torch.equal(step.input_ids, first.input_ids)
    assert first.input_ids.shape == (8, 512) and (first.input_ids[:, -1] == synthetic.EOS).all()
    assert (first.labels[:, 1] == synthetic.EOS).all()


@pytest.mark.parametrize("task", TASKS)
def test_ids_are_byt5_bytes_and_items_locate_the_non_filler_tokens(task):
    data = synthetic.generate(task, 4, seed=0, length=512)
    texts = synthetic.examples(task, 4, seed=0, length=512)
    tokenizer = ByT5Tokenizer()
    for row, items, example in zip(data.input_ids, data.items, texts):
        assert tokenizer(example["source"]).input_ids == row.tolist()
        assert tokenizer(example["target"]).input_ids[0] == data.labels[texts.index(example), 0]
        assert sorted(items[items >= 0].tolist()) == sorted(parse(example["source"]))


def test_filler_is_the_demos_dots_or_lowercase_noise():
    example = synthetic.examples("order", 1, seed=0, length=512)[0]
    assert set(example["source"]) - set(synthetic.LETTERS) == {"."}
    noisy = synthetic.examples("order", 1, seed=0, length=512, filler=synthetic.NOISE)[0]
    assert len(set(noisy["source"]) - set(synthetic.LETTERS)) == 26
    with pytest.raises(ValueError, match="filler"):
        synthetic.generate("order", 1, seed=0, filler="aB")


def test_geometry_follows_the_model():
    assert Geometry.of(CoLT5Config.from_preset("tiny")) == TINY
    small = Geometry.of(CoLT5Config.from_preset("tiny", local_radius=7, relative_attention_max_distance=64))
    assert small.reach == 14 and small.gap == 32
    # the heavy attention's buckets: every distance up to near_max has a bucket below the top one, far_min has the top
    from colt5_hf.t5_attention import relative_position_bucket

    buckets = relative_position_bucket(torch.tensor([small.near_max, small.far_min, 10_000]), True, 32, 64)
    assert buckets[0] < buckets[1] == buckets[2]
    with pytest.raises(ValueError, match="too short"):
        synthetic.generate("nearest", 1, seed=0, length=300)
    coarse = Geometry.of(CoLT5Config.from_preset("tiny", relative_attention_num_buckets=16,
                                                 relative_attention_max_distance=16))
    with pytest.raises(ValueError, match="near_max"):
        synthetic.generate("nearest", 1, seed=0, length=2048, geometry=coarse)


def bayes_accuracy_bounds(train, test):
    """A Bayes classifier estimated from counts: (its accuracy on the counts it was fitted to, an upper estimate;
    its accuracy on held-out counts, a lower one). train, test: (cells, 2) counts of the two answers per cell."""
    fitted = np.maximum(train[:, 0], train[:, 1]).sum() / train.sum()
    choice = train.argmax(1)
    held_out = test[np.arange(len(test)), choice].sum() / test.sum()
    return held_out, fitted


def test_order_shortcut_lies_between_the_estimates_of_a_bayes_classifier_on_samples():
    """The exact shortcut (answer from one letter's position) against that classifier estimated on 2 x 100000 drawn
    examples: on its own examples it overestimates, on held-out ones it underestimates."""
    counts = []
    for seed in (0, 1):
        positions = synthetic.order_positions(np.random.default_rng(seed), 100_000, 512, TINY)
        counts.append(np.stack([np.bincount(positions[:, 0], minlength=512),
                                np.bincount(positions[:, 1], minlength=512)], 1))
    low, high = bayes_accuracy_bounds(*counts)
    exact = synthetic.order_shortcut(512, TINY)
    assert low - 0.002 <= exact <= high + 0.002 and high - low < 0.01


def test_nearest_shortcut_lies_between_the_estimates_of_a_bayes_classifier_on_samples():
    """The exact shortcut (answer from both letters' positions, not the anchor's) against that classifier estimated
    on drawn examples, at a short length where 2 x 300000 examples fill the table of position pairs."""
    geometry = Geometry(reach=2, near_max=12, far_min=13)
    length = 2 * geometry.gap + 2 * (geometry.far_min + geometry.gap) + 12
    counts = []
    for seed in (0, 1):
        positions = synthetic.nearest_positions(np.random.default_rng(seed), 300_000, length, geometry)
        table = np.zeros((length, length))
        np.add.at(table, (positions[:, 1], positions[:, 2]), 1)  # [near letter, far letter]
        upper = np.triu_indices(length, 1)
        counts.append(np.stack([table[upper], table.T[upper]], 1))  # per unordered pair: which one is near
    low, high = bayes_accuracy_bounds(*counts)
    exact = synthetic.nearest_shortcut(length, geometry)
    assert low - 0.002 <= exact <= high + 0.002 and high - low < 0.03


def test_chain_shortcut_lies_between_the_estimates_of_a_bayes_classifier_on_samples():
    """The exact shortcut (B told from A by their positions) against that classifier estimated on 2 x 300000 drawn
    examples at a short length."""
    geometry = Geometry(reach=2, near_max=14, far_min=15)
    length = synthetic.minimum_length("chain", geometry) + 6
    counts = []
    for seed in (0, 1):
        positions = synthetic.chain_positions(np.random.default_rng(seed), 300_000, length, geometry)
        table = np.zeros((length, length))
        np.add.at(table, (positions[:, 1], positions[:, 2]), 1)  # [A, B]
        upper = np.triu_indices(length, 1)
        counts.append(np.stack([table[upper], table.T[upper]], 1))
    low, high = bayes_accuracy_bounds(*counts)
    exact = synthetic.chain_shortcut(length, geometry)
    assert low - 0.002 <= exact <= high + 0.002 and high - low < 0.03


def test_calibration_ceilings_lie_below_the_threshold_of_a_solution():
    """A run at >= 95% has learned the relation: no shortcut or local model reaches that far."""
    for length in (512, 2048):
        for task in TASKS:
            calibration = synthetic.calibration(task, length)
            assert calibration["chance"] <= calibration["local"] <= calibration["shortcut"] < 0.9
            assert calibration["true"] == 1.0
    assert set(synthetic.SUITE) < set(TASKS)
