"""`hf-moso push`: publish a pruned dataset, its scored rows and its card to a dataset repository on the Hub."""

from transformers.utils import logging

from .card import add_card_arguments, build_card


logger = logging.get_logger(__name__)


def add_parser(subparsers, **shared) -> None:
    parser = subparsers.add_parser(
        "push",
        **shared,
        help="publish a pruned dataset and its card to the Hub",
        description=(
            "Publish PRUNED_DIR (a folder written by hf-moso prune) to the dataset repository REPO_ID: the kept rows "
            "as configuration 'default', every scored row as configuration 'scored' (unless --pruned_only), and "
            "the dataset card with its histogram. The token comes from HF_TOKEN or `hf auth login`; the Hub address "
            "from HF_ENDPOINT."
        ),
    )
    parser.add_argument("pruned_dir", metavar="PRUNED_DIR", help="folder written by hf-moso prune")
    parser.add_argument("repo_id", metavar="REPO_ID", help="dataset repository, namespace/name; created if missing")
    parser.add_argument("--private", action="store_true", help="create the repository as private (default: public)")
    parser.add_argument("--revision", help="branch to push to (default: main)")
    parser.add_argument(
        "--max_shard_size", help="largest Parquet shard, such as 500MB (default: the datasets default)"
    )
    parser.add_argument("--split", help="split name in the repository (default: the scored split, else train)")
    add_card_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> None:
    # Imported here, like the card module, so that the other commands start without it.
    from ..hub import push_pruned_dataset

    card, pruned, scored = build_card(args)
    url = push_pruned_dataset(
        args.repo_id,
        pruned,
        card,
        scored_dataset=None if args.pruned_only else scored,
        split=args.split,
        private=args.private or None,
        revision=args.revision,
        max_shard_size=args.max_shard_size,
    )
    logger.info(f"Published {len(pruned)} rows and the dataset card: {url}")
