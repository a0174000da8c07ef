"""Datasets given on the command line: loading from a folder, a file or the Hub, and tokenization for the model."""

import hashlib
import inspect
import json
import os
from dataclasses import dataclass

from datasets import Dataset, DatasetDict, Value, load_dataset, load_from_disk
from torch import nn
from transformers.utils import logging

from ..labels import check_labels
from .errors import InvalidInputError


logger = logging.get_logger(__name__)

# File suffixes read with a `datasets` packaged builder, and the builder for each.
FILE_BUILDERS = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".arrow": "arrow",
}
LABEL_COLUMNS = ("label", "labels")


def _is_saved_dataset(folder: str) -> bool:
    names = set(os.listdir(folder))
    return "dataset_dict.json" in names or {"dataset_info.json", "state.json"} <= names


def _reject_empty_saved_dataset(folder: str) -> None:
    # `save_to_disk` of 0 rows writes no data file, and `load_from_disk` (datasets 5.2) then fails with an IndexError.
    state_file = os.path.join(folder, "state.json")
    if not os.path.isfile(state_file):
        return
    with open(state_file, encoding="utf-8") as stream:
        state = json.load(stream)
    if state.get("_data_files") == []:
        raise InvalidInputError(
            f"The dataset {folder} has 0 rows; MoSo compares each row with the others, so it needs at least 2. "
            "Check the path."
        )


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in FILE_BUILDERS


def load_dataset_source(source: str, split: str | None, config_name: str | None = None, revision: str | None = None):
    """
    Load `source`: a folder written by `save_to_disk`, a data file (parquet, JSON lines, CSV/TSV, Arrow), a folder of
    data files, or a dataset id on the Hub, and return the `Dataset` of split `split`.

    `split` defaults to `train`, or to the only split of a saved `DatasetDict`.

    Raises:
        InvalidInputError: when the source is not found or cannot be read, or the split does not exist.
    """
    if os.path.isdir(source):
        if _is_saved_dataset(source):
            _reject_empty_saved_dataset(source)
            data = load_from_disk(source)
        else:
            data = load_dataset(source, split=split or "train")
    elif os.path.isfile(source):
        suffix = os.path.splitext(source)[1].lower()
        if suffix not in FILE_BUILDERS:
            raise InvalidInputError(
                f"Cannot read the dataset file {source}: unknown suffix {suffix!r}. Give a file ending in "
                f"{', '.join(FILE_BUILDERS)}, or a folder written by `Dataset.save_to_disk`."
            )
        if split not in (None, "train"):
            raise InvalidInputError(
                f"--split {split!r} was given, but a single data file such as {source} has only the split 'train'. "
                "Leave out --split, or give a folder or Hub dataset with that split."
            )
        options = {"delimiter": "\t"} if suffix == ".tsv" else {}
        data = load_dataset(FILE_BUILDERS[suffix], data_files=source, split="train", **options)
    elif _looks_like_path(source):
        raise InvalidInputError(f"The dataset {source} does not exist. Check the path.")
    else:
        try:
            data = load_dataset(source, name=config_name, split=split or "train", revision=revision)
        except (FileNotFoundError, ConnectionError, ValueError) as error:
            message = " ".join(str(error).split())
            raise InvalidInputError(
                f"Cannot load the dataset {source!r} from the Hub ({message}). Check the id, --config_name and "
                "--split, the network connection and HF_HUB_OFFLINE, or give a local path."
            ) from error

    if isinstance(data, DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        split = split or "train"
        if split not in data:
            raise InvalidInputError(
                f"Split {split!r} not found in {source}; it has splits {list(data)}. Pass --split."
            )
        data = data[split]
    return data


def resolve_label_column(dataset: Dataset, label_column: str | None) -> str:
    """Return `label_column`, or `label`/`labels` when it is `None`; raise `InvalidInputError` when missing."""
    if label_column is not None:
        if label_column not in dataset.column_names:
            raise InvalidInputError(
                f"Label column {label_column!r} not found; the dataset has columns {dataset.column_names}. Pass the "
                "name of the class column with --label_column."
            )
        return label_column
    for name in LABEL_COLUMNS:
        if name in dataset.column_names:
            return name
    raise InvalidInputError(
        f"The dataset has no labels: none of its columns {dataset.column_names} is 'label' or 'labels'. MoSo "
        "scores rows by the gradient of their loss, which needs a label; pass its column with --label_column."
    )


def model_input_names(model: nn.Module) -> list[str]:
    """Names of the arguments of `model.forward`."""
    return list(inspect.signature(model.forward).parameters)


def _tokenizer_digest(tokenizer_folder: str | None) -> str | None:
    # The tokenized rows change whenever the tokenizer files do, so their checksums enter the fingerprint.
    if tokenizer_folder is None:
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(tokenizer_folder)):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "spiece", "sentencepiece")):
            digest.update(name.encode())
            with open(os.path.join(tokenizer_folder, name), "rb") as stream:
                digest.update(stream.read())
    return digest.hexdigest()


def _text_columns(dataset: Dataset) -> list[str]:
    return [
        name
        for name, feature in dataset.features.items()
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string")
    ]


@dataclass
class RowsPlan:
    """Plan that turns the user's rows into model inputs, with the fingerprint of the result."""

    label_column: str
    input_columns: list[str]
    text_column: str | None
    text_pair_column: str | None
    max_length: int | None
    fingerprint: str


def plan_rows(
    dataset: Dataset,
    model: nn.Module,
    tokenizer,
    tokenizer_folder: str | None,
    label_column: str | None,
    text_column: str | None,
    text_pair_column: str | None,
    max_length: int | None,
) -> RowsPlan:
    """
    Check the labels and decide how the rows become model inputs: tokenize text when the dataset contains no
    model input yet, and keep only the model inputs and the label.

    The plan's fingerprint depends only on the rows, the options and the tokenizer files, so the same command on
    the same data finds the same partial results. Nothing is written yet.
    """
    label_column = resolve_label_column(dataset, label_column)
    try:
        check_labels(dataset, label_column, model)
    except ValueError as error:
        raise InvalidInputError(f"{error} Name the right column with --label_column if this is not it.") from error

    inputs = [name for name in model_input_names(model) if name not in ("labels", "label", "kwargs")]
    present = [name for name in dataset.column_names if name in inputs and name != label_column]
    if text_column is None and not present:
        candidates = [name for name in _text_columns(dataset) if name != label_column]
        if len(candidates) != 1:
            raise InvalidInputError(
                f"The dataset has none of the model inputs {inputs[:4]} and {len(candidates)} text columns "
                f"{candidates}. Pass the column to tokenize with --text_column."
            )
        text_column = candidates[0]
        logger.info(f"Tokenizing the text column {text_column!r}.")

    if text_column is not None:
        for option, name in (("--text_column", text_column), ("--text_pair_column", text_pair_column)):
            if name is not None and name not in dataset.column_names:
                raise InvalidInputError(
                    f"{option} {name!r} not found; the dataset has columns {dataset.column_names}."
                )
        if tokenizer is None:
            raise InvalidInputError(
                f"The model folder has no tokenizer, so the text column {text_column!r} cannot be tokenized. Save "
                "the tokenizer with the model (pass `processing_class=tokenizer` to MoSoTrainer and call "
                "`save_model`), or give a dataset that is already tokenized."
            )
        if max_length is None:
            limits = [
                getattr(tokenizer, "model_max_length", None),
                getattr(model.config, "max_position_embeddings", None),
            ]
            limits = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
            max_length = min(limits) if limits else None
        present = []

    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "rows": dataset._fingerprint,
                "input_columns": present,
                "text_column": text_column,
                "text_pair_column": text_pair_column,
                "label_column": label_column,
                "max_length": max_length,
                "tokenizer": _tokenizer_digest(tokenizer_folder) if text_column is not None else None,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    return RowsPlan(label_column, present, text_column, text_pair_column, max_length, fingerprint)


def build_rows(dataset: Dataset, plan: RowsPlan, tokenizer, cache_file: str) -> Dataset:
    """Apply `plan` to `dataset`; tokenized rows are written to `cache_file`, never next to the user's data."""
    if plan.text_column is None:
        return dataset.select_columns(plan.input_columns + [plan.label_column], new_fingerprint=plan.fingerprint)

    def tokenize(batch):
        pairs = batch[plan.text_pair_column] if plan.text_pair_column is not None else None
        truncation = plan.max_length is not None
        encoded = tokenizer(batch[plan.text_column], pairs, truncation=truncation, max_length=plan.max_length)
        encoded[plan.label_column] = batch[plan.label_column]
        return encoded

    return dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        new_fingerprint=plan.fingerprint,
        cache_file_name=cache_file,
        load_from_cache_file=False,
        desc="Tokenizing",
    )
