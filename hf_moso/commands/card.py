"""`hf-moso card`: the dataset card of a pruned dataset, with the histogram of its scores."""

import os
import shutil

from transformers.utils import logging

from ..snapshots import read_manifest
from .errors import InvalidInputError
from .outputs import load_result_dataset, read_result_info
from .prune import PRUNE_INFO_FILE
from .score import SCORES_INFO_FILE


logger = logging.get_logger(__name__)

CARD_FILE = "README.md"


def add_card_arguments(parser) -> None:
    """Options that set the card's metadata; `card` and `push` share them."""
    parser.add_argument(
        "--source_dataset",
        help="name of the source dataset on the Hub (default: the DATASET given to hf-moso score)",
    )
    parser.add_argument("--source_revision", help="commit of the source dataset (default: the --revision of score)")
    parser.add_argument("--model_name", help="name or path of the trained model (default: the MODEL_DIR of score)")
    parser.add_argument("--license", help="license identifier of the card (default: the source dataset's license)")
    parser.add_argument("--language", nargs="+", help="language codes of the data (default: none)")
    parser.add_argument("--pretty_name", help="display name of the dataset (default: none)")
    parser.add_argument("--tags", nargs="+", help="tags added to 'moso' and 'data-pruning' (default: none)")
    parser.add_argument(
        "--pruned_only",
        action="store_true",
        help="describe (and push) only the kept rows (default: also every scored row as configuration 'scored')",
    )


def add_parser(subparsers, **shared) -> None:
    parser = subparsers.add_parser(
        "card",
        **shared,
        help="write the dataset card of a pruned dataset",
        description=(
            "Write the dataset card of PRUNED_DIR (a folder written by hf-moso prune): metadata, the selection, "
            "score statistics and histogram, rows per class, the snapshots and the MoSo citation. The card goes to "
            f"PRUNED_DIR/{CARD_FILE} with its image under PRUNED_DIR/images."
        ),
    )
    parser.add_argument("pruned_dir", metavar="PRUNED_DIR", help="folder written by hf-moso prune")
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {CARD_FILE}")
    add_card_arguments(parser)
    parser.set_defaults(run=run)


def build_card(args):
    """Return `(card, pruned, scored)` for the pruned folder `args.pruned_dir` and the card options in `args`."""
    # Imported here because the card module loads matplotlib and Jinja2, which the other commands do not need.
    from ..card import create_dataset_card

    prune_info = read_result_info(args.pruned_dir, PRUNE_INFO_FILE)
    scores_dir = prune_info["scores_dir"]
    scores_info = read_result_info(scores_dir, SCORES_INFO_FILE)
    pruned = load_result_dataset(args.pruned_dir)
    scored = load_result_dataset(scores_dir)
    if len(scored) != prune_info["rows_before"] or len(pruned) != prune_info["rows_after"]:
        raise InvalidInputError(
            f"The datasets in {scores_dir} ({len(scored)} rows) and {args.pruned_dir} ({len(pruned)} rows) no longer "
            f"match the row counts in {PRUNE_INFO_FILE}. Run hf-moso prune again."
        )

    card = create_dataset_card(
        pruned,
        scored,
        read_manifest(scores_info["snapshot_dir"]),
        source_dataset=args.source_dataset or scores_info["dataset"],
        model_name=args.model_name or scores_info["model_dir"],
        source_revision=args.source_revision or scores_info.get("revision"),
        source_config=scores_info.get("config_name"),
        source_split=scores_info.get("split"),
        label_column=prune_info["label_column"] or scores_info.get("label_column"),
        keep=prune_info["keep"],
        threshold=prune_info["threshold"],
        class_balanced=prune_info["class_balanced"],
        scored_config=None if args.pruned_only else "scored",
        license=args.license,
        language=args.language,
        pretty_name=args.pretty_name,
        tags=args.tags,
    )
    return card, pruned, scored


def save_card(card, folder: str) -> None:
    """Write the card and its images into `folder`: images first, the card file last, each by a rename."""
    staging = os.path.join(folder, f".card.tmp-{os.getpid()}")
    if os.path.lexists(staging):
        shutil.rmtree(staging)
    card.save(os.path.join(staging, CARD_FILE))
    for relative_path in card.images:
        target = os.path.join(folder, relative_path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(staging, relative_path), target)
    os.replace(os.path.join(staging, CARD_FILE), os.path.join(folder, CARD_FILE))
    shutil.rmtree(staging)


def run(args) -> None:
    path = os.path.join(args.pruned_dir, CARD_FILE)
    if os.path.lexists(path) and not args.overwrite:
        raise InvalidInputError(f"{path} already exists. Pass --overwrite to replace it.")
    card, _, _ = build_card(args)
    save_card(card, args.pruned_dir)
    logger.info(f"Wrote the dataset card to {path}.")
