"""Result folders written whole: built under a temporary name, then moved into place by one rename."""

import json
import os
import shutil

from datasets import Dataset, load_from_disk
from transformers.utils import logging

from .errors import InvalidInputError


logger = logging.get_logger(__name__)


def check_output_free(path: str, overwrite: bool, option: str = "--output") -> None:
    """Raise `InvalidInputError` when `path` exists and `overwrite` is not set, before any work starts."""
    if os.path.lexists(path) and not overwrite:
        raise InvalidInputError(
            f"The output folder {path} already exists. Pass --overwrite to replace it, or choose another {option}."
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InvalidInputError(f"The output path {path} exists and is not a folder. Choose another {option}.")


def staging_folder(path: str) -> str:
    """Return a temporary sibling of `path` to build its contents in, after removing a leftover of this process id."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp-{os.getpid()}")
    if os.path.lexists(staging):
        shutil.rmtree(staging)
    return staging


def publish_folder(staging: str, path: str, overwrite: bool) -> None:
    """
    Move the finished folder `staging` to `path` by a rename, so `path` never contains a partial result.

    With `overwrite`, an existing `path` is first renamed aside and deleted after the new folder is in place. A
    process killed between these two renames leaves the earlier result under `<path>.replaced-<pid>`.
    """
    if os.path.lexists(path):
        if not overwrite:
            shutil.rmtree(staging)
            raise InvalidInputError(
                f"The output folder {path} was created while this command ran. Pass --overwrite to replace it, or "
                "choose another output folder."
            )
        aside = f"{path}.replaced-{os.getpid()}"
        os.replace(path, aside)
        os.replace(staging, path)
        shutil.rmtree(aside)
        logger.info(f"Replaced the earlier result in {path}.")
        return
    os.replace(staging, path)


def load_result_dataset(folder: str) -> Dataset:
    """Load the dataset of a result folder written by `hf-moso score` or `hf-moso prune`."""
    if not os.path.isdir(folder):
        raise InvalidInputError(f"The folder {folder} does not exist. Give a result folder of hf-moso.")
    try:
        dataset = load_from_disk(folder)
    except FileNotFoundError as error:
        raise InvalidInputError(
            f"No dataset saved with save_to_disk found in {folder}. Give a result folder of hf-moso."
        ) from error
    if not isinstance(dataset, Dataset):
        raise InvalidInputError(f"The folder {folder} contains a DatasetDict, not a result folder of hf-moso.")
    return dataset


def read_result_info(folder: str, name: str) -> dict:
    """Read the JSON file `name` that hf-moso wrote into the result folder `folder`."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise InvalidInputError(
            f"{path} not found, so {folder} is not a result folder of the hf-moso command that writes {name}."
        )
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)
