"""`hf-moso prune`: keep the highest-scoring rows of a result folder of `hf-moso score`."""

import json
import os
import re
import shutil

import numpy as np
from datasets import ClassLabel, Dataset, Value
from transformers.utils import logging

from ..dataset import SCORE_COLUMN, prune_dataset
from .errors import InvalidInputError
from .outputs import check_output_free, load_result_dataset, publish_folder, staging_folder


logger = logging.get_logger(__name__)

PRUNE_INFO_FILE = "moso_prune.json"
PRUNE_INFO_FORMAT_VERSION = 1
ROW_COUNT = re.compile(r"^[0-9]+$")


def add_parser(subparsers, **shared) -> None:
    parser = subparsers.add_parser(
        "prune",
        **shared,
        help="keep the highest-scoring rows",
        description=(
            "Keep the highest-scoring rows of SCORES_DIR (a result folder of hf-moso score) and write them, with "
            "every original column and their moso_score, to a new dataset folder (load it with "
            "datasets.load_from_disk). Rows keep their original order; among equal scores the earlier row is kept."
        ),
    )
    parser.add_argument("scores_dir", metavar="SCORES_DIR", help="result folder of hf-moso score")
    parser.add_argument("--output", required=True, metavar="DIR", help="dataset folder to create for the kept rows")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    selection = parser.add_mutually_exclusive_group(required=True)
    selection.add_argument(
        "--keep",
        help="rows to keep: a fraction in (0, 1] written with a decimal point (0.7, 1.0), or a row count (700)",
    )
    selection.add_argument(
        "--threshold",
        type=float,
        metavar="SCORE",
        help="keep the rows whose MoSo score is at least this value (with --class_balanced: that many rows)",
    )
    parser.add_argument(
        "--class_balanced",
        action="store_true",
        help="give every class a share of the kept rows proportional to its size, filled with its own best rows "
        "(default: the best rows overall)",
    )
    parser.add_argument("--label_column", help="column of the classes (default: 'label' or 'labels')")
    parser.add_argument(
        "--allow_empty_classes",
        action="store_true",
        help="drop a class that would keep no row with a warning (default: stop with an error)",
    )
    parser.set_defaults(run=run)


def parse_keep(text: str) -> float | int:
    """Turn the text of --keep into a row count (digits only) or a fraction (any other number)."""
    text = text.strip()
    if ROW_COUNT.match(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError(
            f"Invalid --keep value {text!r}. Give a fraction in (0, 1] with a decimal point, such as 0.7, or a row "
            "count, such as 700."
        ) from None


def _label_name(dataset: Dataset, label_column: str | None) -> str | None:
    if label_column is not None:
        if label_column not in dataset.column_names:
            raise InvalidInputError(
                f"Label column {label_column!r} not found; the scored dataset has columns {dataset.column_names}. "
                "Pass the name of the class column with --label_column."
            )
        return label_column
    return next((name for name in ("label", "labels") if name in dataset.column_names), None)


def check_classes_kept(scored: Dataset, pruned: Dataset, label_column: str | None, allow_empty_classes: bool) -> None:
    """Reject (or with `allow_empty_classes`, warn about) a selection that keeps no row of some class."""
    label_name = _label_name(scored, label_column)
    feature = scored.features[label_name] if label_name is not None else None
    is_class = isinstance(feature, ClassLabel) or (
        isinstance(feature, Value) and (feature.dtype.startswith(("int", "uint")) or feature.dtype == "string")
    )
    if not is_class:
        return
    before = np.unique(np.asarray(scored.with_format(None)[label_name]))
    after = np.unique(np.asarray(pruned.with_format(None)[label_name]))
    removed = np.setdiff1d(before, after).tolist()
    if not removed:
        return
    message = (
        f"Keeping {len(pruned)} of {len(scored)} rows removes every row of class(es) {removed} (column {label_name!r})"
    )
    if not allow_empty_classes:
        raise InvalidInputError(
            f"{message}. Keep more rows, add --class_balanced, or pass --allow_empty_classes to accept this."
        )
    logger.warning(f"{message}; continuing because --allow_empty_classes is set.")


def run(args) -> None:
    check_output_free(args.output, args.overwrite)
    keep = parse_keep(args.keep) if args.keep is not None else None
    scored = load_result_dataset(args.scores_dir)
    if SCORE_COLUMN not in scored.column_names:
        raise InvalidInputError(
            f"The dataset in {args.scores_dir} has no {SCORE_COLUMN!r} column. Give a result folder of hf-moso score."
        )
    _label_name(scored, args.label_column)

    try:
        pruned = prune_dataset(
            scored,
            keep=keep,
            threshold=args.threshold,
            class_balanced=args.class_balanced,
            label_column=args.label_column if args.class_balanced else None,
            allow_empty_classes=args.allow_empty_classes,
        )
    except ValueError as error:
        message = str(error).replace("pass `allow_empty_classes=True`", "pass --allow_empty_classes")
        option = "--keep" if keep is not None else "--threshold"
        raise InvalidInputError(f"{message} ({option} {args.keep if keep is not None else args.threshold})") from error
    except TypeError as error:
        raise InvalidInputError(f"Invalid --keep value {args.keep!r}: {error}") from error
    if not args.class_balanced:
        check_classes_kept(scored, pruned, args.label_column, args.allow_empty_classes)

    staging = staging_folder(args.output)
    try:
        pruned.save_to_disk(staging)
        write_prune_info(staging, args, keep, len(scored), len(pruned))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_folder(staging, args.output, args.overwrite)
    logger.info(f"Kept {len(pruned)} of {len(scored)} rows in {args.output}.")


def write_prune_info(staging: str, args, keep, rows_before: int, rows_after: int) -> None:
    info = {
        "format_version": PRUNE_INFO_FORMAT_VERSION,
        "scores_dir": os.path.abspath(args.scores_dir),
        "keep": keep,
        "threshold": args.threshold,
        "class_balanced": args.class_balanced,
        "label_column": args.label_column,
        "allow_empty_classes": args.allow_empty_classes,
        "rows_before": rows_before,
        "rows_after": rows_after,
    }
    with open(os.path.join(staging, PRUNE_INFO_FILE), "w", encoding="utf-8") as stream:
        json.dump(info, stream, indent=2)
