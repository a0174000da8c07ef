"""
Dataset cards for MoSo-pruned datasets.

`create_dataset_card` fills the template `model_cards/moso_dataset_card.md` (the `hf_moso.model_cards` package) through
`huggingface_hub.DatasetCard.from_template`. The card contains YAML metadata, the source dataset and revision, and
the model and snapshots (steps and learning rates) that produced the scores. It also states the keep setting, the
rows per class before and after, a histogram of the scores, how to reproduce the run and the citation of the MoSo
paper (Tan et al., "Data Pruning via Moving-one-Sample-out", NeurIPS 2023).
"""

import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Image, Value
from huggingface_hub import CommitOperationAdd, DatasetCard, DatasetCardData, HfApi, constants
from transformers import TrainingArguments
from transformers.utils import logging

from .dataset import SCORE_COLUMN, resolve_label_column, score_array
from .histogram import score_histogram_png
from .selection import keep_count, threshold_count
from .snapshots import Manifest


logger = logging.get_logger(__name__)

TEMPLATE_PATH = Path(str(resources.files("hf_moso.model_cards") / "moso_dataset_card.md"))
HISTOGRAM_PATH = "images/moso_score_histogram.png"
CARD_TAGS = ("moso", "data-pruning")

MOSO_CITATION = """@inproceedings{tan2023moso,
  title     = {Data Pruning via Moving-one-Sample-out},
  author    = {Tan, Haoru and Wu, Sitong and Du, Fei and Chen, Yukang and Wang, Zhibin and Wang, Fan and Qi, Xiaojuan},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {36},
  year      = {2023}
}"""

# Training arguments shown in the reproduction snippet, when the caller passes them.
REPRODUCTION_FIELDS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "seed",
    "moso_parameters",
)

# Size bins of the Hub's `size_categories` metadata field, by upper bound on the row count.
SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)
# A license identifier as the Hub's `license` field takes it (`mit`, `cc-by-4.0`, `apache-2.0`, ...).
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
# `namespace/name`, as on the Hub. A bare name is not linked, because it may as well be a local or library name.
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class MoSoDatasetCard(DatasetCard):
    """
    A `huggingface_hub.DatasetCard` together with the image files that its text links to by relative path.

    Attributes:
        images: paths relative to the card (such as `images/moso_score_histogram.png`) mapped to the file bytes.
            `save` writes them beside the card file and `push_to_hub` uploads them into the repository.
        scored_config: name of the configuration that contains every scored row, or `None` when the card describes
            the pruned rows only.
    """

    def __init__(self, content: str, ignore_metadata_errors: bool = False):
        super().__init__(content, ignore_metadata_errors=ignore_metadata_errors)
        self.images: dict[str, bytes] = {}
        self.scored_config: str | None = None

    def copy(self) -> "MoSoDatasetCard":
        """Return an independent copy of the card text, metadata and images."""
        card = type(self)(str(self), ignore_metadata_errors=self.ignore_metadata_errors)
        card.images = dict(self.images)
        card.scored_config = self.scored_config
        return card

    def save(self, filepath: str | Path) -> None:
        """
        Write the card to `filepath` and each image to its relative path beside it.

        Example:
            ```python
            card.save("pruned/README.md")  # also writes pruned/images/moso_score_histogram.png
            ```
        """
        super().save(filepath)
        folder = Path(filepath).parent
        for relative_path, data in self.images.items():
            target = folder / relative_path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        repo_type: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        revision: str | None = None,
        create_pr: bool | None = None,
        parent_commit: str | None = None,
    ) -> str:
        """
        Upload the images, then the card, to an existing repository, and return the URL of the card's commit.

        The card is validated by the Hub first, so a card the Hub rejects uploads nothing. The images go in one
        commit and `README.md` in a second one whose parent is the first, so the card never links to an image that
        is not in the repository. Arguments are those of `DatasetCard.push_to_hub`.
        """
        if create_pr and self.images:
            raise ValueError(
                "`create_pr=True` would put the images and the card into two separate pull requests. Push to a "
                "branch with `revision=` instead, and open a pull request from it."
            )
        repo_type = repo_type or self.repo_type
        self.validate(repo_type=repo_type)

        if self.images:
            api = HfApi(endpoint=constants.ENDPOINT, token=token)
            operations = [
                CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in self.images.items()
            ]
            commit = api.create_commit(
                repo_id,
                operations=operations,
                commit_message=f"Upload {len(operations)} image(s) of the dataset card",
                repo_type=repo_type,
                revision=revision,
                parent_commit=parent_commit,
            )
            parent_commit = commit.oid
        return super().push_to_hub(
            repo_id,
            token=token,
            repo_type=repo_type,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            parent_commit=parent_commit,
        )


def size_category(num_rows: int) -> str:
    """
    Return the Hub's `size_categories` bin for `num_rows` rows.

    Example:
        >>> size_category(5452)
        '1K<n<10K'
    """
    for bound, name in SIZE_CATEGORIES:
        if num_rows < bound:
            return name
    return "n>1B"


def describe_feature(feature) -> str:
    """Return a short Markdown description of a `datasets` feature for the column table."""
    if isinstance(feature, ClassLabel):
        return f"class label ({feature.num_classes} classes)"
    if isinstance(feature, Value):
        return f"`{feature.dtype}`"
    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, dict):
        return "struct of " + ", ".join(f"`{name}`" for name in feature)
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return f"list of {describe_feature(inner)}"
    return type(feature).__name__


def infer_task_categories(features, label_column: str | None) -> list[str]:
    """Guess the Hub task category of a classification dataset from its features: image or text, else none."""
    if label_column is None:
        return []
    others = [feature for name, feature in features.items() if name not in (label_column, SCORE_COLUMN)]
    if any(isinstance(feature, Image) for feature in others):
        return ["image-classification"]
    if any(isinstance(feature, Value) and feature.dtype in ("string", "large_string") for feature in others):
        return ["text-classification"]
    return []


def hub_link(name: str, prefix: str) -> str:
    """Return Markdown for a dataset or model name: a Hub link for a `namespace/name` id, else inline code."""
    if REPO_ID.match(name) and not Path(name).exists():
        return f"[`{name}`]({constants.ENDPOINT}/{prefix}{name})"
    return f"`{name}`"


def format_score(value: float) -> str:
    return f"{value:.6g}"


def score_statistics(scores: np.ndarray, kept: np.ndarray) -> list[dict]:
    """Rows of the score statistics table: count, min, quartiles, max and mean of all and of the kept scores."""
    rows = [{"name": "rows", "all": str(scores.size), "kept": str(kept.size)}]
    for name, function in (
        ("minimum", np.min),
        ("25th percentile", lambda values: np.percentile(values, 25)),
        ("median", np.median),
        ("75th percentile", lambda values: np.percentile(values, 75)),
        ("maximum", np.max),
        ("mean", np.mean),
    ):
        rows.append({"name": name, "all": format_score(function(scores)), "kept": format_score(function(kept))})
    return rows


def class_table(scored_dataset: Dataset, pruned: Dataset, label_column: str) -> list[dict]:
    """Rows of the per-class table: each class of the source split with its row counts before and after pruning."""
    feature = scored_dataset.features[label_column]
    before = np.asarray(scored_dataset.with_format(None)[label_column])
    after = np.asarray(pruned.with_format(None)[label_column])
    if before.ndim != 1:
        raise ValueError(
            f"The label column {label_column!r} contains values of shape {before.shape[1:]} per row; the per-class "
            "table needs one class per row. Pass `label_column=` with a column of single labels."
        )
    counts_before = {value.item(): int(count) for value, count in zip(*np.unique(before, return_counts=True))}
    counts_after = {value.item(): int(count) for value, count in zip(*np.unique(after, return_counts=True))}
    # Every class of a ClassLabel is listed, also one without rows, so that a missing class shows.
    classes = range(feature.num_classes) if isinstance(feature, ClassLabel) else sorted(counts_before)
    rows = []
    for value in classes:
        name = feature.int2str(value) if isinstance(feature, ClassLabel) else str(value)
        count, kept = counts_before.get(value, 0), counts_after.get(value, 0)
        rows.append({"name": name, "before": count, "after": kept, "kept": f"{kept / count:.1%}" if count else "-"})
    return rows


def snapshot_rows(manifest: Manifest) -> list[dict]:
    return [
        {
            "step": snapshot.step,
            "learning_rates": ", ".join(repr(float(rate)) for rate in snapshot.learning_rates),
            "epoch": "" if snapshot.epoch is None else f"{snapshot.epoch:.3g}",
        }
        for snapshot in manifest.snapshots
    ]


def training_argument_values(training_arguments) -> dict:
    """Select the `REPRODUCTION_FIELDS` of `TrainingArguments` or of a mapping, as plain Python values."""
    if training_arguments is None:
        return {}
    if isinstance(training_arguments, TrainingArguments):
        values = training_arguments.to_dict()
    elif isinstance(training_arguments, Mapping):
        values = dict(training_arguments)
    else:
        raise TypeError(
            f"`training_arguments` must be TrainingArguments (or MoSoConfig) or a dict, got "
            f"{type(training_arguments).__name__}."
        )
    selected = {}
    for name in REPRODUCTION_FIELDS:
        value = values.get(name)
        if value is None or (name == "max_steps" and value <= 0):
            continue
        selected[name] = getattr(value, "value", value)
    return selected


def source_license(license: str | list[str] | None, scored_dataset: Dataset) -> str | list[str] | None:
    """Return the card's license: `license` when given, else the source's `DatasetInfo.license` if it is an id."""
    if license is not None:
        return license
    candidate = (scored_dataset.info.license or "").strip()
    if LICENSE_ID.match(candidate):
        return candidate
    if candidate:
        logger.warning(
            f"The source dataset's license text {candidate[:60]!r} is not a Hub license identifier, so the card "
            "states no license. Pass `license=` with the identifier (for example 'cc-by-4.0')."
        )
    else:
        logger.info("The source dataset's license is unknown, so the card states no license; pass `license=`.")
    return None


def check_keep_settings(
    scores: np.ndarray, rows_after: int, keep: float | int | None, threshold: float | None, class_balanced: bool
) -> str:
    """Return the selection as text for the card; raise unless the keep settings give `rows_after` rows."""
    if (keep is None) == (threshold is None):
        raise ValueError(
            f"Give exactly one of `keep` (got {keep!r}) and `threshold` (got {threshold!r}), as passed to the pruning "
            "call, so that the card states how the rows were chosen."
        )
    if threshold is None:
        expected = keep_count(keep, scores.size)
        setting = f"`keep={keep!r}`"
        text = f"{setting}: the top {expected} rows"
        if class_balanced:
            text = f"{setting}: {expected} rows, the best of each class"
    else:
        expected = threshold_count(scores, threshold)
        setting = f"`threshold={threshold!r}`"
        text = f"{setting}: {expected} rows score at least {format_score(threshold)}"
        if class_balanced:
            text += ", and that many rows were kept class-balanced"
    if expected != rows_after:
        raise ValueError(
            f"The pruned dataset has {rows_after} rows, but {setting} of {scores.size} scored rows keeps {expected}. "
            "Pass the keep settings that produced the pruned dataset."
        )
    return text


def create_dataset_card(
    pruned: Dataset,
    scored_dataset: Dataset,
    manifest: Manifest,
    *,
    source_dataset: str,
    model_name: str,
    source_revision: str | None = None,
    source_config: str | None = None,
    source_split: str | None = None,
    label_column: str | None = None,
    keep: float | int | None = None,
    threshold: float | None = None,
    class_balanced: bool = False,
    scored_config: str | None = "scored",
    license: str | list[str] | None = None,
    task_categories: list[str] | None = None,
    language: str | list[str] | None = None,
    pretty_name: str | None = None,
    tags: list[str] | None = None,
    training_arguments: TrainingArguments | Mapping | None = None,
    template_path: str | Path | None = None,
) -> MoSoDatasetCard:
    """
    Build the dataset card of a MoSo-pruned dataset, with the histogram of the scores as an image.

    The YAML metadata holds the license (from `license`, else from the source's `DatasetInfo.license` when it is an
    identifier), task categories (given, or guessed for image and text classification), the tags `moso` and
    `data-pruning`, the source dataset and a size category. The body states the source dataset and revision, the
    selection and the fraction kept, score statistics, rows per class before and after, the model and each
    snapshot's step and learning rates, the columns, a reproduction snippet and the MoSo citation. The histogram is
    stored in `card.images` under `images/moso_score_histogram.png` and linked by that relative path.

    Args:
        pruned: the kept rows, with their `moso_score` column (as returned by `prune_dataset`).
        scored_dataset: every row of the source split with its `moso_score` column (as returned by
            `add_moso_scores` or `MoSoTrainer.score_dataset`).
        manifest: the snapshot manifest of the run, from `read_manifest(folder)`.
        source_dataset: name of the source dataset on the Hub, or its local path.
        model_name: name or path of the model that was trained to record the snapshots.
        source_revision: the commit of the source dataset that was loaded; recommended, so the card pins the data.
        source_config: the configuration of the source dataset, if it has several.
        source_split: the split that was pruned. Defaults to `pruned.split`, else `train`.
        label_column: the class column. Defaults to `label` or `labels`; without one the per-class table is left
            out (unless `class_balanced`, which needs it).
        keep, threshold, class_balanced: the settings given to `prune_dataset`; exactly one of `keep` and
            `threshold`. They are checked against the row counts.
        scored_config: the configuration under which the scored split will be published, or `None` when only the
            pruned rows are published. `push_pruned_dataset` follows it.
        license, task_categories, language, pretty_name, tags: metadata overrides; `tags` are added to `moso` and
            `data-pruning`.
        training_arguments: the `MoSoConfig` (or a dict) of the run, for the reproduction snippet.
        template_path: a Jinja template to use instead of `model_cards/moso_dataset_card.md`.

    Returns:
        A `MoSoDatasetCard`; `card.save(path)` writes it with its image, `push_pruned_dataset` publishes it.

    Example:
        ```python
        scored = trainer.score_dataset()
        pruned = prune_dataset(scored, keep=0.7, class_balanced=True)
        card = create_dataset_card(
            pruned, scored, read_manifest(trainer.args.moso_snapshot_folder),
            source_dataset="trec", source_revision="1f3c1a5", model_name="bert-base-uncased",
            keep=0.7, class_balanced=True,
        )
        card.save("trec-moso/README.md")
        ```
    """
    for name, dataset in (("pruned", pruned), ("scored_dataset", scored_dataset)):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"`{name}` must be a datasets.Dataset, got {type(dataset).__name__}.")
        if SCORE_COLUMN not in dataset.column_names:
            raise ValueError(
                f"`{name}` has no {SCORE_COLUMN!r} column (columns: {dataset.column_names}). Use the outputs of "
                "`add_moso_scores` (every row) and `prune_dataset` (kept rows)."
            )
    if not manifest.snapshots:
        raise ValueError("The snapshot manifest lists no snapshot; MoSo scores need at least one recorded snapshot.")

    # The scores: all rows, the kept rows, and a check that the kept rows come from the scored split.
    scores = score_array(scored_dataset.with_format(None)[SCORE_COLUMN], len(scored_dataset))
    kept_scores = score_array(pruned.with_format(None)[SCORE_COLUMN], len(pruned))
    if len(pruned) == 0 or len(pruned) > len(scored_dataset) or not np.isin(kept_scores, scores).all():
        raise ValueError(
            f"The pruned dataset ({len(pruned)} rows) is not a subset of the scored dataset ({len(scored_dataset)} "
            "rows): its scores do not all occur there. Pass the scored split that was pruned."
        )
    selection = check_keep_settings(scores, len(pruned), keep, threshold, class_balanced)

    # The classes.
    if label_column is None and not class_balanced and not {"label", "labels"} & set(scored_dataset.column_names):
        label_name = None
        logger.info("No label column ('label' or 'labels'); the card has no per-class table.")
    else:
        label_name = resolve_label_column(scored_dataset, label_column)
    class_rows = class_table(scored_dataset, pruned, label_name) if label_name is not None else []

    # The metadata.
    split = source_split or (str(pruned.split) if pruned.split is not None else "train")
    kept_fraction = len(pruned) / len(scored_dataset)
    if task_categories is None:
        task_categories = infer_task_categories(pruned.features, label_name)
    if source_revision is None:
        logger.warning(
            f"No `source_revision` given: the card cannot pin which commit of {source_dataset!r} was pruned."
        )
    card_data = DatasetCardData(
        license=source_license(license, scored_dataset),
        language=language,
        task_categories=task_categories or None,
        tags=list(CARD_TAGS) + [tag for tag in (tags or []) if tag not in CARD_TAGS],
        size_categories=[size_category(len(pruned))],
        source_datasets=[source_dataset],
        pretty_name=pretty_name or f"{source_dataset} pruned with MoSo ({kept_fraction:.0%} kept)",
    )

    # The reproduction snippet.
    load_arguments = [repr(source_dataset)]
    if source_config is not None:
        load_arguments.append(repr(source_config))
    if source_revision is not None:
        load_arguments.append(f"revision={source_revision!r}")
    load_arguments.append(f"split={split!r}")
    config_arguments = ["output_dir='moso-run'", f"moso_snapshot_steps={list(manifest.planned_steps)!r}"]
    config_arguments += [f"{name}={value!r}" for name, value in training_argument_values(training_arguments).items()]
    prune_arguments = [f"keep={keep!r}" if threshold is None else f"threshold={threshold!r}"]
    if class_balanced:
        prune_arguments += ["class_balanced=True", f"label_column={label_name!r}"]

    card = MoSoDatasetCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        pretty_name=card_data.pretty_name,
        source_markdown=hub_link(source_dataset, "datasets/"),
        source_revision=source_revision,
        source_config=source_config,
        source_split=split,
        rows_before=len(scored_dataset),
        rows_after=len(pruned),
        kept_fraction=f"{kept_fraction:.4f}",
        kept_percent=f"{kept_fraction:.1%}",
        selection=selection,
        class_balanced=class_balanced,
        label_column=label_name,
        score_column=SCORE_COLUMN,
        histogram_path=HISTOGRAM_PATH,
        score_statistics=score_statistics(scores, kept_scores),
        class_rows=class_rows,
        model_name=model_name,
        model_markdown=hub_link(model_name, ""),
        model_class=manifest.model_class,
        max_steps=manifest.max_steps if manifest.max_steps is not None else "an unrecorded number of",
        snapshots=snapshot_rows(manifest),
        multiple_groups=any(len(snapshot.learning_rates) > 1 for snapshot in manifest.snapshots),
        scored_config=scored_config,
        columns=[{"name": name, "type": describe_feature(feature)} for name, feature in pruned.features.items()],
        load_arguments=", ".join(load_arguments),
        config_arguments=config_arguments,
        prune_arguments=", ".join(prune_arguments),
        citation=MOSO_CITATION,
    )
    card.scored_config = scored_config
    card.images[HISTOGRAM_PATH] = score_histogram_png(
        scores,
        kept_scores=kept_scores,
        cutoff=threshold if threshold is not None else float(kept_scores.min()),
        cutoff_label="threshold" if threshold is not None else "lowest kept score",
        title=f"MoSo scores of {source_dataset} ({split})",
    )
    return card
