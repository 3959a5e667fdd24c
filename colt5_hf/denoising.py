"""UL2's mixture of denoisers on packed documents: the training data of `colt5-hf uptrain`.

UL2 (Tay et al. 2022, "Unifying Language Learning Paradigms") trains an encoder-decoder on a mixture of denoisers:

- span corruption (R, regular: short spans, 15% of the tokens; X, extreme: long spans or a high rate): a share `rate` of
  a chunk's tokens is cut out in spans of mean length `mean_span`; each span is replaced in the input by a sentinel
  token and the target lists the sentinels, each followed by the tokens it stands for (T5's objective);
- prefix LM (S, sequential): the chunk is split once; the input is its beginning, the target its end (the last `rate`
  of the chunk), which is span corruption with a single span at the end of the chunk.

Each input starts with the denoiser's mode prefix (UL2's "[NLU]", "[NLG]", "[S2S]"), written as text and tokenized like
the documents, as UL2 prepends its prompts: no tokenizer or embedding grows, and every tokenizer can write it.

Documents are tokenized, joined with the end-of-sequence token between them and cut into consecutive chunks, one per
example: each example draws its denoiser from the mixture (a seeded random generator, so the same files and seed give
the same examples) and takes as many tokens as fit its input in `length` and its target in `max_target_length` tokens
(special tokens included). Every token of the documents lands in exactly one example, in the input or the target.

Span layout (as T5's `random_spans_noise_mask`, written anew): a chunk of n tokens gets round(n * rate) noise tokens
(at least 1, at most n - 1) in round(noise / mean_span) spans (at least 1); the noise tokens and the kept tokens are
each cut into that many non-empty runs uniformly at random, and the chunk alternates kept run, noise run, starting with
kept tokens. Sentinels are the tokenizer's `<extra_id_0>`, `<extra_id_1>`, ... in order; a chunk with more spans than
the tokenizer has sentinels (T5's 100 at rate 0.15 and mean span 3 hold about 2,000 tokens) uses them again from
`<extra_id_0>`: inputs and targets list the spans in the same order, so they still pair up.
"""

import bisect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np


MIXTURE_FOLDER = Path(__file__).resolve().parent / "presets"  # the mixtures ship as denoisers-NAME.json
MIXTURE_PREFIX = "denoisers-"
KINDS = ("span", "prefix")


class MixtureError(ValueError):
    """A mixture of denoisers that cannot be used, worded for the command line."""


@dataclass(frozen=True)
class Denoiser:
    """One denoiser of the mixture.

    name: what the evaluation reports its loss as (`eval_NAME_loss`); kind: "span" (span corruption, R and X) or
    "prefix" (prefix LM, S); rate: the share of a chunk's tokens that go to the target; mean_span: the mean length of
    the spans ("span" only); weight: how often it is drawn, relative to the others; mode: the text that starts every
    input it makes ("" for none)."""

    name: str
    kind: str
    rate: float
    mean_span: float | None = None
    weight: float = 1.0
    mode: str = ""

    def __post_init__(self):
        where = f"denoiser {self.name!r}"
        if not isinstance(self.name, str) or not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise MixtureError(f"denoiser name {self.name!r}: use letters, digits, '-' and '_' (it names a metric)")
        if self.kind not in KINDS:
            raise MixtureError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(self.rate, (int, float)) or not 0 < self.rate < 1:
            raise MixtureError(f"{where}: rate must lie strictly between 0 and 1, got {self.rate!r}")
        if self.kind == "span":
            if not isinstance(self.mean_span, (int, float)) or self.mean_span < 1:
                raise MixtureError(f"{where}: a span denoiser needs mean_span >= 1, got {self.mean_span!r}")
        elif self.mean_span is not None:
            raise MixtureError(f"{where}: a prefix denoiser has one span, the chunk's end: drop mean_span")
        if not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise MixtureError(f"{where}: weight must be positive, got {self.weight!r}")
        if not isinstance(self.mode, str):
            raise MixtureError(f"{where}: mode must be text, got {self.mode!r}")


def mixture_names() -> list[str]:
    """The mixtures shipped with the package (colt5_hf/presets/denoisers-NAME.json)."""
    return sorted(path.stem[len(MIXTURE_PREFIX):] for path in MIXTURE_FOLDER.glob(f"{MIXTURE_PREFIX}*.json"))


def load_mixture(spec: str) -> list[Denoiser]:
    """The denoisers of a shipped mixture ("colt5", "ul2", "ul2r") or of a JSON file of the same form: an object whose
    "denoisers" is a list of objects with the fields of `Denoiser`."""
    path = Path(spec)
    if spec in mixture_names():
        path = MIXTURE_FOLDER / f"{MIXTURE_PREFIX}{spec}.json"
    elif path.suffix != ".json":
        raise MixtureError(f"{spec!r} is neither a mixture ({', '.join(mixture_names())}) nor a JSON file")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise MixtureError(f"cannot read the mixture {path} ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise MixtureError(f"{path} is not UTF-8 text: a mixture is a JSON object") from None
    except json.JSONDecodeError as error:
        raise MixtureError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
                           ) from None
    denoisers = values.get("denoisers") if isinstance(values, dict) else None
    if not isinstance(denoisers, list) or not denoisers:
        raise MixtureError(f'{path}: a mixture is a JSON object whose "denoisers" is a non-empty list')
    fields = set(Denoiser.__dataclass_fields__)
    mixture = []
    for number, entry in enumerate(denoisers, 1):
        if not isinstance(entry, dict):
            raise MixtureError(f"{path}: denoiser {number} is a JSON {type(entry).__name__}, not an object")
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise MixtureError(f"{path}: denoiser {number} has unknown field(s) {', '.join(unknown)}; the fields are "
                               f"{', '.join(Denoiser.__dataclass_fields__)}")
        try:
            mixture.append(Denoiser(**entry))
        except TypeError as error:  # a required field missing
            raise MixtureError(f"{path}: denoiser {number}: {error}") from None
        except MixtureError as error:
            raise MixtureError(f"{path}: {error}") from None
    names = [denoiser.name for denoiser in mixture]
    if len(set(names)) != len(names):
        raise MixtureError(f"{path}: two denoisers are named {next(n for n in names if names.count(n) > 1)!r}")
    return mixture


# ------------------------------------------------------------------------------------------------- one example


def span_counts(length: int, rate: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) of a chunk of `length` tokens: round(length * rate) tokens, at least 1 and at most
    length - 1 (a single token is all noise), in round(noise / mean_span) spans, at least 1 and at most as many as
    there are noise tokens and kept tokens."""
    noise = min(max(round(length * rate), 1), max(length - 1, 1))
    spans = min(max(round(noise / mean_span), 1), noise, max(length - noise, 1))
    return noise, spans


def random_parts(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` items cut into `parts` non-empty runs, every cut equally likely (zero items: one empty run)."""
    if total == 0:
        return [0] * parts
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [end - start for start, end in zip([0, *cuts], [*cuts, total])]


def span_layout(denoiser: Denoiser, length: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(kept run lengths, noise run lengths) of a chunk of `length` tokens: the chunk is kept[0], noise[0], kept[1],
    noise[1], ... A prefix denoiser has one run of each: the chunk's beginning, then its last `rate`."""
    if denoiser.kind == "prefix":
        noise, _ = span_counts(length, denoiser.rate, 1)
        return [length - noise], [noise]
    noise, spans = span_counts(length, denoiser.rate, denoiser.mean_span)
    return random_parts(length - noise, spans, rng), random_parts(noise, spans, rng)


def corrupt(tokens, kept: list[int], noise: list[int], sentinels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of `tokens` laid out as `kept` and `noise` runs: the input holds the kept runs with sentinel i
    in place of noise run i; the target holds sentinel i followed by noise run i, for every i. Sentinel i is
    sentinels[i % len(sentinels)]. No mode prefix and no end-of-sequence token."""
    tokens = np.asarray(tokens)
    inputs, targets = [], []
    start = 0
    for i, (kept_length, noise_length) in enumerate(zip(kept, noise)):
        sentinel = np.array([sentinels[i % len(sentinels)]], dtype=tokens.dtype)
        inputs += [tokens[start:start + kept_length], sentinel]
        start += kept_length
        targets += [sentinel, tokens[start:start + noise_length]]
        start += noise_length
    if start != len(tokens):
        raise ValueError(f"the runs cover {start} tokens, not the chunk's {len(tokens)}")
    return np.concatenate(inputs), np.concatenate(targets)


def example_lengths(denoiser: Denoiser, length: int, mode_length: int) -> tuple[int, int]:
    """(input, target) lengths of the example a chunk of `length` tokens makes, the mode prefix and end-of-sequence
    tokens included. They do not depend on the random layout, only on the counts."""
    if denoiser.kind == "prefix":
        noise, spans = span_counts(length, denoiser.rate, 1)[0], 1
    else:
        noise, spans = span_counts(length, denoiser.rate, denoiser.mean_span)
    return mode_length + length - noise + spans + 1, noise + spans + 1


def longest_chunk(denoiser: Denoiser, max_input: int, max_target: int, mode_length: int) -> int:
    """The most tokens a chunk of `denoiser` may take for its example to fit `max_input` input and `max_target` target
    tokens (both lengths grow with the chunk, never shrink: a binary search); 0 if not even one token fits."""
    def fits(length):
        inputs, targets = example_lengths(denoiser, length, mode_length)
        return inputs <= max_input and targets <= max_target

    low, high = 0, max_input + max_target  # every chunk token is in the input or the target: never longer
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


# ---------------------------------------------------------------------------------------------------- packing


@dataclass
class DenoisingData:
    """What the denoisers need from the tokenizer: sentinel ids, the end-of-sequence id, and each mode prefix's ids."""

    sentinels: list[int]
    eos: int
    modes: dict[str, list[int]]  # denoiser name -> token ids of its mode prefix


def sentinel_ids(tokenizer) -> list[int]:
    """The ids of the tokenizer's `<extra_id_0>`, `<extra_id_1>`, ... in that order (T5, mT5, ByT5 and LongT5
    tokenizers have 100 or more); empty if it has none."""
    vocabulary = tokenizer.get_vocab()
    ids = []
    while f"<extra_id_{len(ids)}>" in vocabulary:
        ids.append(vocabulary[f"<extra_id_{len(ids)}>"])
    return ids


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` as plain text: no end-of-sequence token added, and text that spells a special token
    ("<extra_id_0>", "</s>") is split like any other text, so that no document holds a sentinel."""
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False).input_ids


def denoising_data(tokenizer, mixture: list[Denoiser], mode_tokens: bool = True) -> DenoisingData:
    sentinels = sentinel_ids(tokenizer)
    if not sentinels:
        raise MixtureError("the tokenizer has no sentinel tokens (<extra_id_0>, <extra_id_1>, ...) for the denoisers "
                           "to mark spans with: use a T5, mT5 or ByT5 tokenizer (--tokenizer)")
    if tokenizer.eos_token_id is None:
        raise MixtureError("the tokenizer has no end-of-sequence token: use a T5, mT5 or ByT5 tokenizer")
    modes = {d.name: encode(tokenizer, [d.mode])[0] if mode_tokens and d.mode else [] for d in mixture}
    return DenoisingData(sentinels, tokenizer.eos_token_id, modes)


def token_stream(documents: list[list[int]], eos: int) -> np.ndarray:
    """The documents' tokens one after the other, each document followed by the end-of-sequence token."""
    pieces = []
    for document in documents:
        pieces += [np.asarray(document, dtype=np.int64), np.array([eos], dtype=np.int64)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def check_lengths(mixture: list[Denoiser], data: DenoisingData, length: int, max_target_length: int) -> dict:
    """{denoiser name: the most tokens one of its chunks takes}; an error names a denoiser that fits no token."""
    chunks = {}
    for denoiser in mixture:
        mode_length = len(data.modes[denoiser.name])
        chunks[denoiser.name] = longest_chunk(denoiser, length, max_target_length, mode_length)
        if chunks[denoiser.name] == 0:
            raise MixtureError(
                f"denoiser {denoiser.name}: inputs of {length} and targets of {max_target_length} tokens hold no text "
                f"(its input needs {mode_length} mode token(s), a sentinel and the end-of-sequence token; its target "
                "a sentinel and the end-of-sequence token besides): raise --length or --max-target-length"
            )
    return chunks


def pack(stream, mixture: list[Denoiser], data: DenoisingData, length: int, max_target_length: int, seed: int,
         only: str | None = None) -> list[dict]:
    """The examples of a token stream: consecutive chunks, each with a denoiser drawn from the mixture by weight (or
    always the denoiser named `only`, for an evaluation set per denoiser), as long as its example fits `length` input
    and `max_target_length` target tokens or the stream's end. Each example is {"input_ids", "labels", "denoiser"}
    (numpy int32 arrays, the mode prefix first and the end-of-sequence token last in both; "denoiser" the denoiser's
    index in the mixture). The same stream, mixture and seed give the same examples."""
    chunks = check_lengths(mixture, data, length, max_target_length)
    rng = random.Random(seed)
    weights = [denoiser.weight for denoiser in mixture]
    cumulative = list(np.cumsum(weights))
    stream = np.asarray(stream)
    eos = np.array([data.eos])
    examples = []
    start = 0
    while start < len(stream):
        if only is None:
            index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
            index = min(index, len(mixture) - 1)
        else:
            index = next(i for i, denoiser in enumerate(mixture) if denoiser.name == only)
        denoiser = mixture[index]
        chunk = stream[start:start + chunks[denoiser.name]]
        start += len(chunk)
        kept, noise = span_layout(denoiser, len(chunk), rng)
        inputs, targets = corrupt(chunk, kept, noise, data.sentinels)
        mode = np.asarray(data.modes[denoiser.name], dtype=stream.dtype)
        examples.append({"input_ids": np.concatenate([mode, inputs, eos]).astype(np.int32),
                         "labels": np.concatenate([targets, eos]).astype(np.int32), "denoiser": index})
    return examples


class Examples:
    """A list of packed examples as a map-style dataset for Trainer: each item {"input_ids", "labels"} as lists."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        example = self.examples[index]
        return {"input_ids": example["input_ids"].tolist(), "labels": example["labels"].tolist()}


__all__ = ["Denoiser", "DenoisingData", "Examples", "MixtureError", "corrupt", "denoising_data", "encode",
           "example_lengths", "load_mixture", "longest_chunk", "mixture_names", "pack", "random_parts",
           "sentinel_ids", "span_counts", "span_layout", "token_stream"]
