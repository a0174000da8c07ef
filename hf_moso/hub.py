"""
Publishing a MoSo-pruned dataset to the Hugging Face Hub: the pruned rows, optionally every scored row as a second
configuration, and the dataset card with its histogram.
"""

from datasets import Dataset
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from transformers.utils import logging

from .card import MoSoDatasetCard
from .dataset import SCORE_COLUMN


logger = logging.get_logger(__name__)

PRUNED_CONFIG = "default"


def source_dataset_license(
    source_dataset: str, revision: str | None = None, token: str | bool | None = None
) -> str | list[str] | None:
    """
    Read the `license` field of a dataset's card on the Hub; return `None` when it is unknown or unreachable.

    Pass the result to `create_dataset_card(license=...)` so the pruned dataset carries the source's license.
    Failures (no such repository, offline mode, HTTP errors) are logged as warnings, never raised.

    Example:
        ```python
        license = source_dataset_license("my-name/source-data", revision="main")
        card = create_dataset_card(..., license=license)
        ```
    """
    try:
        info = HfApi(endpoint=constants.ENDPOINT, token=token).dataset_info(source_dataset, revision=revision)
    except (HfHubHTTPError, OfflineModeIsEnabled) as error:
        logger.warning(f"Could not read the license of {source_dataset!r} from the Hub: {type(error).__name__}.")
        return None
    license = info.card_data.get("license") if info.card_data is not None else None
    if license is None:
        logger.info(f"The card of {source_dataset!r} states no license.")
    return license


def check_scored(name: str, dataset) -> None:
    if not isinstance(dataset, Dataset):
        raise TypeError(f"`{name}` must be a datasets.Dataset, got {type(dataset).__name__}.")
    if SCORE_COLUMN not in dataset.column_names:
        raise ValueError(
            f"`{name}` has no {SCORE_COLUMN!r} column (columns: {dataset.column_names}); publish the outputs of "
            "`prune_dataset` and `add_moso_scores`."
        )


def card_with_hub_metadata(
    card: MoSoDatasetCard, hub_card: DatasetCard, pushed: dict[str, Dataset]
) -> MoSoDatasetCard:
    """
    Return a copy of `card` with the `configs` and `dataset_info` that `push_to_hub` wrote to the Hub's card.

    `Dataset.push_to_hub` (datasets 5.2) keeps the features already listed for a configuration when the same
    split is pushed again. After a push with other columns the listed features no longer match the data, and
    `load_dataset` fails to cast the Parquet files. So the features of each configuration in `pushed` are replaced
    by the features of the data that was just pushed. Sizes and splits come from the Hub's card.
    """
    published = card.copy()
    infos = DatasetInfosDict.from_dataset_card_data(hub_card.data)
    for config_name, dataset in pushed.items():
        if config_name in infos:
            infos[config_name].features = dataset.features.copy()

    configs = hub_card.data.get("configs")
    if configs is not None:
        published.data["configs"] = configs
    published.data.pop("dataset_info", None)
    infos.to_dataset_card_data(published.data)

    earlier = sorted(
        {entry.get("config_name") for entry in configs or [] if entry.get("config_name") not in pushed} - {None}
    )
    if earlier:
        logger.warning(
            f"The repository also contains configuration(s) {earlier} from an earlier push, which this card does not "
            "describe. Delete their data folders with `HfApi().delete_folder(...)` if they are stale."
        )
    return published


def push_pruned_dataset(
    repo_id: str,
    pruned: Dataset,
    card: MoSoDatasetCard,
    scored_dataset: Dataset | None = None,
    *,
    split: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    max_shard_size: int | str | None = None,
) -> str:
    """
    Publish a pruned dataset, optionally every scored row, and its card to a dataset repository on the Hub.

    The pruned rows are pushed with `Dataset.push_to_hub` as configuration `default`, and `scored_dataset` (when
    given) as configuration `card.scored_config`. Then the card goes up through `MoSoDatasetCard.push_to_hub`,
    which uploads the histogram first. The card carries the `configs` and `dataset_info` that the pushes wrote,
    with the features taken from the pushed data. The repository is created when it does not exist. `token` is
    passed to `huggingface_hub` and never logged.

    Args:
        repo_id: the dataset repository, `namespace/name`.
        pruned: the kept rows with their `moso_score` column.
        card: the card from `create_dataset_card`.
        scored_dataset: every row of the source split with its score. Required when `card.scored_config` is set,
            rejected when it is `None`.
        split: the split name in the repository. Defaults to `pruned.split`, else `train`.
        private: visibility of a repository created here; an existing repository keeps its visibility.
        token: a Hub token; defaults to the saved login or `HF_TOKEN`.
        revision: the branch to push to; defaults to `main`.
        max_shard_size: the largest Parquet shard, as in `Dataset.push_to_hub`.

    Returns:
        The URL of the commit that added the card.

    Example:
        ```python
        card = create_dataset_card(pruned, scored, manifest, source_dataset="trec", model_name="bert-base-uncased",
                                   keep=0.7, class_balanced=True)
        push_pruned_dataset("my-name/trec-moso-70", pruned, card, scored_dataset=scored)
        load_dataset("my-name/trec-moso-70", split="train")             # the kept rows
        load_dataset("my-name/trec-moso-70", "scored", split="train")   # every row with its score
        ```
    """
    check_scored("pruned", pruned)
    if not isinstance(card, MoSoDatasetCard):
        raise TypeError(
            f"`card` must be a MoSoDatasetCard from `create_dataset_card`, got {type(card).__name__}; it carries "
            "the histogram and the name of the scored configuration."
        )
    if card.scored_config is not None and scored_dataset is None:
        raise ValueError(
            f"The card describes a configuration {card.scored_config!r} with every scored row, but no "
            "`scored_dataset` was given. Pass it, or build the card with `scored_config=None`."
        )
    if card.scored_config is None and scored_dataset is not None:
        raise ValueError(
            "`scored_dataset` was given, but the card was built with `scored_config=None` and would not describe "
            "it. Build the card with `scored_config='scored'` (or another name), or leave `scored_dataset` unset."
        )
    if card.scored_config == PRUNED_CONFIG:
        raise ValueError(f"`scored_config` must differ from {PRUNED_CONFIG!r}, the configuration of the pruned rows.")
    if scored_dataset is not None:
        check_scored("scored_dataset", scored_dataset)
        if len(scored_dataset) < len(pruned):
            raise ValueError(
                f"`scored_dataset` has {len(scored_dataset)} rows, fewer than the {len(pruned)} pruned rows; pass the "
                "scored split that was pruned."
            )

    split = split or (str(pruned.split) if pruned.split is not None else "train")
    pushed = {PRUNED_CONFIG: pruned}
    if scored_dataset is not None:
        pushed[card.scored_config] = scored_dataset

    for config_name, dataset in pushed.items():
        logger.info(f"Pushing {len(dataset)} rows to {repo_id}, configuration {config_name!r}, split {split!r}.")
        commit = dataset.push_to_hub(
            repo_id,
            config_name=config_name,
            split=split,
            private=private,
            token=token,
            revision=revision,
            max_shard_size=max_shard_size,
            commit_message=f"Upload the {config_name!r} configuration ({len(dataset)} rows, split {split!r})",
        )
        # `push_to_hub` may resolve a repository name without namespace to the user's namespace.
        repo_id = commit.repo_url.repo_id or repo_id

    readme = hf_hub_download(
        repo_id, "README.md", repo_type="dataset", revision=revision, token=token, endpoint=constants.ENDPOINT
    )
    published = card_with_hub_metadata(card, DatasetCard.load(readme), pushed)
    url = published.push_to_hub(
        repo_id, token=token, revision=revision, commit_message="Add the MoSo dataset card and score histogram"
    )
    logger.info(f"Published the MoSo-pruned dataset and its card to {repo_id}.")
    return url
