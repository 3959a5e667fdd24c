"""Data for the colt5-hf command: text pairs from JSONL/CSV/Parquet files, documents (text files, a field of those
files, a Hub dataset) for uptraining, and tokenisation with explicit length limits."""

import os
import tempfile
from pathlib import Path

import datasets


FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A problem with the user's data, worded for the command line."""


def load_pairs(path, source_field: str, target_field: str | None, cache_dir=None, in_memory: bool = False,
               source_option: str = "--source-field"):
    """A `datasets.Dataset` with the columns `source` (and `target`) read from a JSONL, JSON, CSV or Parquet file.

    datasets keeps the file as Arrow files in `cache_dir` (None: its own cache, HF_DATASETS_CACHE); `in_memory`: in
    memory, through a temporary folder removed before returning. `source_option` is the option that names the source
    field, for the errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    file_format = FILE_FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    with open(path, "rb") as handle:
        blank = not handle.read(1 << 16).strip() and not handle.read(1)
    if blank:
        raise DataError(f"{path}: the file holds no examples")
    if file_format != "parquet":
        check_utf8(path)
    datasets.disable_progress_bars()
    try:
        if in_memory:
            with tempfile.TemporaryDirectory(prefix="colt5-hf-data-") as scratch:
                dataset = datasets.load_dataset(file_format, data_files=str(path), split="train", cache_dir=scratch,
                                                keep_in_memory=True)
        else:
            dataset = datasets.load_dataset(file_format, data_files=str(path), split="train",
                                            cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as error:  # the parsers' own errors name the line; keep them, add the file
        raise DataError(f"{path}: could not read it as {file_format}: {error or type(error).__name__}") from error
    fields = [source_field] + ([target_field] if target_field is not None else [])
    for field, option in zip(fields, (source_option, "--target-field")):
        if field not in dataset.column_names:
            raise DataError(
                f"{path}: no field {field!r} ({option}); the file has the fields {', '.join(dataset.column_names)}"
            )
    if len(dataset) == 0:
        raise DataError(f"{path}: the file holds no examples")
    renames = {source_field: "source"} | ({target_field: "target"} if target_field is not None else {})
    dataset = dataset.select_columns(fields).rename_columns({old: new for old, new in renames.items() if old != new})
    for column in dataset.column_names:
        empty = [i for i, text in enumerate(dataset[column]) if not isinstance(text, str) or not text]
        if empty:
            field = source_field if column == "source" else target_field
            raise DataError(f"{path}: field {field!r} is empty or not text in {len(empty)} example(s), the first at "
                            f"row {empty[0]}")
    return dataset


def load_documents(path, text_field: str, cache_dir=None, in_memory: bool = False) -> list[str]:
    """The documents of a file: a plain text file (any suffix but those of FILE_FORMATS) is one document; a JSONL,
    JSON, CSV or Parquet file holds one per row, in the field `text_field` (--text-field)."""
    path = Path(path)
    if path.suffix.lower() in FILE_FORMATS:
        return load_pairs(path, text_field, None, cache_dir=cache_dir, in_memory=in_memory,
                          source_option="--text-field")["source"]
    if not path.is_file():
        raise DataError(f"{'not a file' if path.exists() else 'data file not found'}: {path}")
    check_utf8(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: the file holds no text")
    return [text]


def load_hub_documents(name: str, config: str | None, split: str, text_field: str, limit: int) -> list[str]:
    """The first `limit` documents of a dataset on the Hugging Face Hub, streamed (nothing is downloaded beyond
    them). Without a network it is an error before anything is read: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set, or the
    Hub unreachable."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE"):
            raise DataError(f"--dataset {name}: {variable} is set, so the Hub is out of reach; export the dataset to "
                            "JSONL or Parquet files where there is a network and pass them with --train-files")
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        documents = []
        for row in rows:
            if text_field not in row:
                raise DataError(f"--dataset {name}: no field {text_field!r} (--text-field); its rows have the fields "
                                f"{', '.join(row)}")
            if isinstance(row[text_field], str) and row[text_field].strip():
                documents.append(row[text_field])
            if len(documents) == limit:
                break
    except DataError:
        raise
    except Exception as error:  # no network, no such dataset, split or config: datasets' own words, on one line
        message = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"--dataset {name}: could not read it from the Hub ({message}); without a network, export "
                        "the dataset to JSONL or Parquet files elsewhere and pass them with --train-files") from error
    if not documents:
        raise DataError(f"--dataset {name}: split {split!r} holds no text in the field {text_field!r}")
    return documents


def check_utf8(path):
    """A text data file must be UTF-8: the first line that is not is an error naming it (the parsers would fail later
    with no line, or read a JSON Lines file whose strings then fail when read)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}: line {number} is not UTF-8 (byte 0x{line[error.start]:02x} at byte "
                                f"{error.start + 1} of the line); save the file as UTF-8") from None


def tokenize_pairs(dataset, tokenizer, max_source_length: int | None, max_target_length: int | None,
                   truncate: bool = False, name: str = "data"):
    """Tokenise `source` (and `target` into `labels`). Inputs longer than the limits are an error naming the first
    offending example, unless `truncate`, which cuts them and returns what it cut.

    Returns the tokenised dataset and a list of report lines (empty when nothing was cut).
    """
    def encode(batch):
        encoded = {"input_ids": tokenizer(batch["source"]).input_ids}
        if "target" in batch:
            encoded["labels"] = tokenizer(batch["target"]).input_ids
        return encoded

    for limit, option in ((max_source_length, "--max-source-length"), (max_target_length, "--max-target-length")):
        if limit is not None and limit < 1:
            raise DataError(f"{option} must be a positive number of tokens, got {limit}")
    datasets.disable_progress_bars()
    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names)
    report = []
    for column, limit, option in (("input_ids", max_source_length, "--max-source-length"),
                                  ("labels", max_target_length, "--max-target-length")):
        if limit is None or column not in tokenized.column_names:
            continue
        lengths = [len(ids) for ids in tokenized[column]]
        too_long = [i for i, length in enumerate(lengths) if length > limit]
        if not too_long:
            continue
        kind = "source" if column == "input_ids" else "target"
        if not truncate:
            first = too_long[0]
            raise DataError(
                f"{name}: {len(too_long)} {kind}(s) longer than {option} {limit} tokens (example {first} has "
                f"{lengths[first]}); raise {option} or pass --truncate to cut them"
            )
        eos = tokenizer.eos_token_id

        def cut(example):  # keep the end-of-sequence token
            ids = example[column]
            if len(ids) > limit:
                ids = ids[: limit - 1] + [eos] if eos is not None and ids[-1] == eos else ids[:limit]
            return {column: ids}

        tokenized = tokenized.map(cut)
        removed = sum(lengths[i] - limit for i in too_long)
        report.append(f"{name}: truncated {len(too_long)} of {len(lengths)} {kind}s to {limit} tokens "
                      f"({removed} tokens cut, longest was {max(lengths)})")
    return tokenized, report


__all__ = ["DataError", "load_pairs", "load_documents", "load_hub_documents", "check_utf8", "tokenize_pairs"]
