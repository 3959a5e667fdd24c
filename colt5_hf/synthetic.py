"""Long-range synthetic tasks: relations between tokens too far apart for local attention, with the accuracy that each
kind of shortcut can reach written down (`calibration`).

Every input is `length` tokens, ByT5 bytes (token = byte + 3, the tokenizer the command uses by default):
`length - 1` characters and the end-of-sequence token. The characters are filler (dots, as in the demo, or random
lowercase letters: `filler=NOISE`) holding a few items made of capital letters and punctuation; the target is one
capital letter. Items keep `gap` = 2 * reach + 4 positions from each other and from both ends of the input, where
reach = layers x local radius is how far a local-attention encoder sees on each side of a token: no output of such an
encoder depends on two items, or on an item and an end of the input.

    order    two different letters; answer the one that comes first.
    nearest  an anchor '#' and two different letters, one of them `near` (gap .. the last distance that the heavy
             attention's relative position buckets tell apart from farther ones) positions from it, the other `far`
             (the top bucket on) on either side; answer the nearer letter.
    chain    an anchor '#' and three different letters: A near the anchor, B near A on the side away from the
             anchor, C far from both and from the anchor; answer the letter nearest to the letter nearest to the anchor
             (B: two hops, each a distance comparison).
    hops     pairs "K>V" (key K, value V) and a query "?Q": answer the value of the value of Q (two hops through
             contents). Not in SUITE: the tiny preset does not learn it in 3000 steps, even with every token routed.

The tasks follow a model's geometry (`Geometry.of(config)`): its reach and its heavy attention's position buckets.
Generation is deterministic per seed (numpy's PCG64), and a training stream seeds each step on its own
(`batch(task, size, seed, step)`), so a run's data do not depend on how it is split into steps.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


TASKS = ("order", "nearest", "chain", "hops")
SUITE = ("order", "nearest", "chain")  # the relations the tiny preset learns within a few thousand steps
FILLER = "."  # the demo's dots; NOISE: every item then also stands out from varied text, which routers find harder
NOISE = "abcdefghijklmnopqrstuvwxyz"
LETTERS = "ABCDEFGHIJKL"  # the capital letters items are made of; answers are one of them
BYTE_OFFSET = 3  # ByT5: token = byte + 3 (0 pad, 1 end of sequence, 2 unknown)
EOS = 1
EVAL_SEED = 1_000_033  # held-out examples: a seed no training stream uses (streams seed (seed, step) pairs)
HOPS_PAIRS = 5  # pairs of the hops task: the two of the chain and three others
CHAIN_OTHERS = 1  # letters of the chain task besides the two of the chain
ITEM_LENGTH = {"order": 1, "nearest": 1, "chain": 1, "hops": 3}  # characters of the task's longest item


@dataclass(frozen=True)
class Geometry:
    """What the tasks need to know of a model. reach: how far its local attention sees on each side of a token through
    all encoder layers (layers x radius); near_max: the largest distance whose relative position bucket differs from
    that of every longer distance; far_min: the first distance of the top bucket."""

    reach: int = 30
    near_max: int = 90
    far_min: int = 91

    @property
    def gap(self) -> int:
        return 2 * self.reach + 4

    @classmethod
    def of(cls, config):
        from .t5_attention import relative_position_bucket

        distances = torch.arange(1, 4 * config.relative_attention_max_distance)
        buckets = relative_position_bucket(distances, bidirectional=True,
                                           num_buckets=config.relative_attention_num_buckets,
                                           max_distance=config.relative_attention_max_distance)
        top = buckets.max()
        far_min = int(distances[buckets == top][0])
        return cls(reach=config.num_layers * config.local_radius, near_max=far_min - 1, far_min=far_min)


TINY = Geometry()  # colt5-tiny: 2 layers x radius 15, 32 buckets up to 128 (the top bucket starts at 91)


@dataclass
class Batch:
    """input_ids (b, length) and labels (b, 2: the answer and the end-of-sequence token), int64; items (b, m): the
    positions of the tokens that the answer depends on (the letters, the anchor, every character of the pairs and the
    query), -1 where a sample has fewer."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    items: torch.Tensor


def check(task, length, geometry):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    if task in ("nearest", "chain") and geometry.near_max < geometry.gap:
        raise ValueError(f"{task}: the model's position buckets tell no distance beyond its local reach from a far "
                         f"one (near_max {geometry.near_max} < gap {geometry.gap}): raise "
                         "relative_attention_max_distance or lower the reach")
    shortest = minimum_length(task, geometry)
    if length < shortest:
        raise ValueError(f"{task}: inputs of {length} tokens are too short for items {geometry.gap} apart "
                         f"(at least {shortest} tokens with reach {geometry.reach})")


def minimum_length(task, geometry):
    gap = geometry.gap
    if task == "order":
        return 3 * gap + 3
    if task == "nearest":
        return 2 * gap + 2 * (geometry.far_min + gap) + 2
    if task == "chain":  # room for the other letter beside any chain (up to 2 near_max long) and its far_min margins
        return 2 * gap + 2 * geometry.near_max + 2 * geometry.far_min + 1
    return (HOPS_PAIRS + 1) * (ITEM_LENGTH["hops"] + gap) + gap + 1


def spaced_starts(rng, count, items, low, high, spacing):
    """(count, items) sorted start positions in [low, high], consecutive ones at least `spacing` apart, uniform over
    all such placements: `items` distinct draws from a range shortened by the spacing (independent draws, rows with a
    repeat drawn again), sorted and spread back out."""
    room = high - low + 1 - (items - 1) * (spacing - 1)
    draws = np.sort(rng.integers(0, room, (count, items)), axis=1)
    while True:
        repeated = (np.diff(draws, axis=1) == 0).any(1)
        if not repeated.any():
            break
        draws[repeated] = np.sort(rng.integers(0, room, (int(repeated.sum()), items)), axis=1)
    return low + draws + np.arange(items) * (spacing - 1)


def order_positions(rng, count, length, geometry):
    """(count, 2): the first letter's position, the second's."""
    gap = geometry.gap
    return spaced_starts(rng, count, 2, gap, length - 2 - gap, gap)


def nearest_positions(rng, count, length, geometry):
    """(count, 3): the anchor's, the near letter's and the far letter's positions. Distances are uniform in their
    ranges, sides independent, the anchor uniform among the places where both fit; drawn by rejection."""
    gap, last = geometry.gap, length - 2 - geometry.gap
    out = np.empty((0, 3), dtype=np.int64)
    while len(out) < count:
        draws = 4 * (count - len(out)) + 16
        near = rng.integers(gap, geometry.near_max + 1, draws) * rng.choice([-1, 1], draws)
        far = rng.integers(geometry.far_min, length // 2 + 1, draws) * rng.choice([-1, 1], draws)
        anchor = rng.integers(gap, last + 1, draws)
        positions = np.stack([anchor, anchor + near, anchor + far], axis=1)
        fits = ((positions >= gap) & (positions <= last)).all(1) & (np.abs(far - near) >= gap)
        out = np.concatenate([out, positions[fits]])
    return out[:count]


def chain_positions(rng, count, length, geometry):
    """(count, 5): the anchor's, A's (near the anchor), B's (near A, on the side away from the anchor) and the other
    letters' positions. The anchor, the two distances (uniform in gap .. near_max) and the side are drawn together by
    rejection, uniform among the placements that fit; then the other letter, uniform among the places at least far_min
    from the anchor, A and B (drawn again until it fits; `minimum_length` leaves room for it beside any chain), which
    leaves the chain's distribution as it was."""
    gap, last = geometry.gap, length - 2 - geometry.gap
    chain = np.empty((0, 3), dtype=np.int64)
    while len(chain) < count:
        draws = 4 * (count - len(chain)) + 16
        side = rng.choice([-1, 1], draws)
        anchor = rng.integers(gap, last + 1, draws)
        first = anchor + side * rng.integers(gap, geometry.near_max + 1, draws)
        second = first + side * rng.integers(gap, geometry.near_max + 1, draws)
        positions = np.stack([anchor, first, second], axis=1)
        chain = np.concatenate([chain, positions[((positions >= gap) & (positions <= last)).all(1)]])
    chain = chain[:count]
    others = np.zeros((count, CHAIN_OTHERS), dtype=np.int64)
    todo = np.arange(count)
    while len(todo):
        candidates = rng.integers(gap, last + 1, (len(todo), CHAIN_OTHERS))
        far = (np.abs(candidates[:, :, None] - chain[todo, None, :]) >= geometry.far_min).all((1, 2))
        apart = (np.abs(np.diff(np.sort(candidates, axis=1), axis=1)) >= gap).all(1)
        others[todo[far & apart]] = candidates[far & apart]
        todo = todo[~(far & apart)]
    return np.concatenate([chain, others], axis=1)


def hops_items(rng, count, length, geometry):
    """(count, 6) item starts (the query's first, then the pairs': the chain's first, its second, three others) and
    (count, 6) letters (the query Q; the keys of the pairs; ...) as (keys (count, 5), values (count, 5), query
    (count,)). The chain: Q -> V1 -> V2, three letters all different; the other pairs' keys differ from each other and
    from Q and V1, their values are any letter but their own key."""
    starts = spaced_starts(rng, count, HOPS_PAIRS + 1, geometry.gap, length - 2 - geometry.gap - 2,
                           ITEM_LENGTH["hops"] + geometry.gap)
    starts = np.take_along_axis(starts, rng.random(starts.shape).argsort(axis=1), axis=1)  # items in random order
    letters = len(LETTERS)
    keys = rng.random((count, letters)).argsort(axis=1)[:, :HOPS_PAIRS]  # distinct: Q, V1, then the others
    answer = rng.random((count, letters)).argsort(axis=1)  # V2: the first letter that is neither Q nor V1
    answer = np.array([row[(row != k[0]) & (row != k[1])][0] for row, k in zip(answer, keys)])
    others = (keys[:, 2:] + rng.integers(1, letters, (count, HOPS_PAIRS - 2))) % letters  # any letter but the key
    values = np.concatenate([keys[:, 1:2], answer[:, None], others], axis=1)
    return starts, keys, values, answer


def render(task, rng, count, length, geometry, filler=FILLER):
    """(chars (count, length - 1) uint8 bytes, answers (count,) bytes, items (count, m) positions)."""
    chars = np.frombuffer(filler.encode(), dtype=np.uint8)[rng.integers(0, len(filler), (count, length - 1))]
    if task == "chain":
        positions = chain_positions(rng, count, length, geometry)
        picks = rng.random((count, len(LETTERS))).argsort(axis=1)[:, :2 + CHAIN_OTHERS]
        chars[np.arange(count), positions[:, 0]] = ord("#")
        chars[np.arange(count)[:, None], positions[:, 1:]] = np.frombuffer(LETTERS.encode(), dtype=np.uint8)[picks]
        return chars, np.frombuffer(LETTERS.encode(), dtype=np.uint8)[picks[:, 1]], positions
    letter_bytes = np.frombuffer(LETTERS.encode(), dtype=np.uint8)
    rows = np.arange(count)[:, None]
    if task == "order":
        positions = order_positions(rng, count, length, geometry)
        picks = rng.random((count, len(LETTERS))).argsort(axis=1)[:, :2]
        chars[rows, positions] = letter_bytes[picks]
        return chars, letter_bytes[picks[:, 0]], positions
    if task == "nearest":
        positions = nearest_positions(rng, count, length, geometry)
        picks = rng.random((count, len(LETTERS))).argsort(axis=1)[:, :2]
        chars[rows, positions[:, :1]] = ord("#")
        chars[rows, positions[:, 1:]] = letter_bytes[picks]
        return chars, letter_bytes[picks[:, 0]], positions
    starts, keys, values, answer = hops_items(rng, count, length, geometry)
    query, pairs = starts[:, :1], starts[:, 1:]
    chars[rows, query] = ord("?")
    chars[rows, query + 1] = letter_bytes[keys[:, :1]]
    chars[rows, pairs] = letter_bytes[keys]
    chars[rows, pairs + 1] = ord(">")
    chars[rows, pairs + 2] = letter_bytes[values]
    items = np.concatenate([query, query + 1, pairs, pairs + 1, pairs + 2], axis=1)
    return chars, letter_bytes[answer], np.sort(items, axis=1)


def generate(task, count, seed, length=512, geometry=TINY, step=None, filler=FILLER) -> Batch:
    """`count` examples of `task`, deterministic in (seed, step): `step=None` for a fixed set (evaluation),
    an integer for one step of a training stream. `filler`: the characters the filler is drawn from (lowercase
    letters; "." gives the demo's dots)."""
    check(task, length, geometry)
    if not filler or any(not ("a" <= c <= "z" or c == ".") for c in filler):
        raise ValueError(f"filler: lowercase letters or '.', got {filler!r} (capitals and #?> make the items)")
    rng = np.random.default_rng([seed, TASKS.index(task)] + ([] if step is None else [step]))
    chars, answers, items = render(task, rng, count, length, geometry, filler)
    input_ids = torch.from_numpy(chars.astype(np.int64) + BYTE_OFFSET)
    input_ids = torch.cat([input_ids, torch.full((count, 1), EOS)], dim=1)
    labels = torch.stack([torch.from_numpy(answers.astype(np.int64) + BYTE_OFFSET), torch.full((count,), EOS)], 1)
    return Batch(input_ids, labels, torch.from_numpy(items.astype(np.int64)))


def batch(task, size, seed, step, length=512, geometry=TINY, filler=FILLER) -> Batch:
    """Training batch `step` of the stream `seed`."""
    return generate(task, size, seed, length, geometry, step=step, filler=filler)


def examples(task, count, seed, length=512, geometry=TINY, filler=FILLER):
    """The examples as text pairs {"source", "target"} (the command's data format; ByT5 gives back the same ids)."""
    data = generate(task, count, seed, length, geometry, filler=filler)
    sources = (data.input_ids[:, :-1] - BYTE_OFFSET).to(torch.uint8).numpy()
    return [{"source": row.tobytes().decode(), "target": chr(int(label) - BYTE_OFFSET)}
            for row, label in zip(sources, data.labels[:, 0])]


# ------------------------------------------------------------------------------------------------------ calibration


def calibration(task, length=512, geometry=TINY) -> dict:
    """What each kind of model can reach on `task` (shares of examples answered right):

    chance: guessing among the letters that could be the answer (order, nearest: the two in the input; chain: the
        three).
    local: any model whose encoder relates no two items (local attention alone; the decoder's cross-attention has no
        positions). order, nearest, chain: swapping letters permutes such an encoder's outputs and leaves the
        distribution of inputs as it was, so it is right as often as a guess among them. hops: with two decoder
        layers (the tiny preset's), cross-attention can look up the query's letter and then the pair it keys, not a
        third item: the best it can do is guess the answer among the other pairs' values (over 20000 examples).
    shortcut: the best answer from the absolute positions of tokens without their relation. order: from where one of
        the two letters sits (exact, over every placement); nearest: from where both letters sit, without the anchor
        (exact); chain: relating the letters but not the anchor, which finds the close pair A, B, then picking B
        from where both sit (exact; C's position, which only tells where the anchor is not, is left out); hops:
        positions carry nothing, as local.
    true: a model that relates the items: 1.0.
    """
    check(task, length, geometry)
    if task == "order":
        local = 0.5
        shortcut = order_shortcut(length, geometry)
        chance = 0.5
    elif task == "nearest":
        local = 0.5
        shortcut = nearest_shortcut(length, geometry)
        chance = 0.5
    elif task == "chain":
        local = chance = 1 / (2 + CHAIN_OTHERS)
        shortcut = chain_shortcut(length, geometry)
    else:
        local = shortcut = hops_content_bound(length, geometry)
        chance = 1 / (len(LETTERS) - 2)
    return {"task": task, "length": length, "chance": chance, "local": local, "shortcut": shortcut, "true": 1.0}


@lru_cache(maxsize=None)
def order_shortcut(length, geometry):
    """Bayes accuracy of answering from the position p of one letter (either, with equal chance): it is the first
    letter with probability (placements with the other after p) / (all placements holding p)."""
    gap, last = geometry.gap, length - 2 - geometry.gap
    p = np.arange(gap, last + 1)
    first = np.clip(last - (p + gap) + 1, 0, None)  # second letter at p + gap .. last
    second = np.clip((p - gap) - gap + 1, 0, None)  # first letter at gap .. p - gap
    return float(np.maximum(first, second).sum() / (first + second).sum())


@lru_cache(maxsize=None)
def nearest_shortcut(length, geometry):
    """Bayes accuracy of answering from the positions of both letters, without the anchor's: every (anchor, near,
    far) placement weighted by its probability under `nearest_positions`; for each pair of letter positions, the
    better of its two assignments."""
    gap, last = geometry.gap, length - 2 - geometry.gap
    x = np.arange(length)[:, None]  # the near letter's position
    y = np.arange(length)[None, :]  # the far letter's
    weight = np.zeros((length, length))  # [x, y]: how many placements put the letters there
    for near_sign in (-1, 1):
        # the near distances d that fit: the anchor x - near_sign * d inside the margins...
        low = np.maximum(gap, x - last if near_sign > 0 else gap - x)
        high = np.minimum(geometry.near_max, x - gap if near_sign > 0 else last - x)
        for far_low, far_high in ((geometry.far_min, length // 2), (-(length // 2), -geometry.far_min)):
            # ...and y - anchor = (y - x) + near_sign * d in the far range on the chosen side
            if near_sign > 0:
                first, last_d = far_low - (y - x), far_high - (y - x)
            else:
                first, last_d = (y - x) - far_high, (y - x) - far_low
            weight += np.clip(np.minimum(high, last_d) - np.maximum(low, first) + 1, 0, None)
    letters_fit = (x >= gap) & (x <= last) & (y >= gap) & (y <= last) & (np.abs(y - x) >= gap)
    weight *= letters_fit
    return float(np.maximum(weight, weight.T).sum() / 2 / weight.sum())


@lru_cache(maxsize=None)
def chain_shortcut(length, geometry):
    """Bayes accuracy of telling B from A by their positions (x: A's, y: B's): every (anchor, d1, side, d2) placement
    that puts them there counted once, as `chain_positions` draws them; for each pair of positions, the better of the
    two assignments."""
    gap, last = geometry.gap, length - 2 - geometry.gap
    x = np.arange(length)[:, None]
    y = np.arange(length)[None, :]
    side = np.sign(y - x)
    # the anchor x - side * d1 inside the margins, d1 in gap .. near_max
    low = np.maximum(gap, np.where(side > 0, x - last, gap - x))
    high = np.minimum(geometry.near_max, np.where(side > 0, x - gap, last - x))
    weight = np.clip(high - low + 1, 0, None).astype(float)
    weight *= (x >= gap) & (x <= last) & (y >= gap) & (y <= last)
    weight *= (np.abs(y - x) >= gap) & (np.abs(y - x) <= geometry.near_max)
    return float(np.maximum(weight, weight.T).sum() / 2 / weight.sum())


@lru_cache(maxsize=None)
def hops_content_bound(length, geometry, count=20000):
    """Accuracy of the best guess of the answer (the value of V1's pair) from Q, V1 and the values of the other
    pairs, not knowing which pair has key V1: the most frequent value among those pairs that can be the answer (not
    Q, not V1), each of those pairs being V1's with equal chance."""
    rng = np.random.default_rng(12345)
    _, keys, values, _ = hops_items(rng, count, length, geometry)
    hits = 0.0
    for key, value in zip(keys, values):
        candidates = [v for v in value[1:] if v not in (key[0], key[1])]
        hits += max(candidates.count(v) for v in set(candidates)) / len(candidates)
    return hits / count


def switch_off_heavy_branch(model):
    """Local attention only (LongT5-local style): zero the output weights of every encoder layer's heavy attention
    and heavy feed-forward and freeze them with the routers, so the heavy branch adds exactly zero, before and after
    training. The light branch, the decoder and every size stay those of the CoLT5 model."""
    with torch.no_grad():
        for block in model.encoder.block:
            attention, feed_forward = block.attention, block.feed_forward
            attention.heavy_attention.o.weight.zero_()
            feed_forward.heavy_feed_forward.wo.weight.zero_()
            for module in (attention.heavy_attention, attention.q_router, attention.kv_router,
                           feed_forward.heavy_feed_forward, feed_forward.router):
                module.requires_grad_(False)
    return model


__all__ = ["TASKS", "Geometry", "TINY", "Batch", "generate", "batch", "examples", "calibration", "EVAL_SEED",
           "switch_off_heavy_branch"]
