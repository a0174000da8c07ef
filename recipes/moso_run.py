"""
The steps that both recipes share around their own data and model: the command line (scoring, thread, pruning and
training arguments), logging set-up, and the end of a run (prune by the MoSo scores, save the kept rows with
`save_to_disk`, print and write a summary).
"""

import inspect
import json
import logging
import os
import sys
import time
from argparse import ArgumentDefaultsHelpFormatter, RawDescriptionHelpFormatter
from dataclasses import asdict, dataclass, field

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset
from transformers import EvalPrediction, HfArgumentParser, set_seed
from transformers.utils import logging as hf_logging

from hf_moso import (
    MoSoConfig,
    MoSoTrainer,
    PerLayerBackend,
    PerSampleGradientBackend,
    keep_count,
    prune_dataset,
    scoring,
)
from hf_moso.scoring import GradientStatisticsBackend


logger = hf_logging.get_logger(__name__)

SUMMARY_NAME = "moso_summary.json"


class RecipeTrainingArguments(MoSoConfig):
    """`MoSoConfig` listed under its own heading in `--help`, after the recipe's own options."""

    _argument_group_name = "Training and scoring (transformers TrainingArguments and the moso_ fields of MoSoConfig)"


USAGE = "%(prog)s [-h] [data, model and pruning options] [training and scoring options]"


class HelpFormatter(ArgumentDefaultsHelpFormatter, RawDescriptionHelpFormatter):
    """Shows every option's default and keeps the line breaks of the description."""


@dataclass
class PruningArguments:
    """How many rows to keep and where the kept rows go."""

    _argument_group_name = "Pruning"

    keep: str = field(
        default="0.7",
        metadata={
            "help": "Rows to keep: a fraction in (0, 1] written with a decimal point (0.7 keeps 70 percent), or a "
            "number of rows written as an integer (500 keeps 500 rows)."
        },
    )
    class_balanced: bool = field(
        default=True,
        metadata={
            "help": "Give every class a quota proportional to its size and fill it with that class's highest-scoring "
            "rows, so that rare classes keep their share (--no_class_balanced keeps the highest scores overall)."
        },
    )
    pruned_dataset_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder for the kept rows (datasets `save_to_disk`). When not given: <output_dir>/pruned_dataset."
        },
    )

    def __post_init__(self):
        self.keep_value = parse_keep(self.keep)


def scoring_backends() -> dict[str, type[GradientStatisticsBackend]]:
    """Collect the scoring backends that `hf_moso.scoring` exports, keyed by their `name`."""
    backends = {}
    for value in vars(scoring).values():
        if isinstance(value, type) and issubclass(value, GradientStatisticsBackend) and not inspect.isabstract(value):
            backends[value.name] = value
    return backends


DEFAULT_BACKEND = PerLayerBackend.name


@dataclass
class ScoringArguments:
    """Choice of the backend that computes the per-row gradient statistics."""

    _argument_group_name = "Scoring"

    scoring_backend: str = field(
        default=DEFAULT_BACKEND,
        metadata={
            "help": f"Backend that computes the per-row gradient statistics. {PerLayerBackend.name} (the default) "
            f"works layer by layer without forming per-row gradients; {PerSampleGradientBackend.name} takes one "
            "backward pass per row and its cost per row grows with --moso_batch_size. Both give the same scores.",
            "choices": sorted(scoring_backends()),
        },
    )

    def create_backend(self) -> GradientStatisticsBackend:
        return scoring_backends()[self.scoring_backend]()


@dataclass
class ThreadArguments:
    """Number of CPU threads of torch's operations."""

    _argument_group_name = "CPU threads"

    torch_threads: int = field(
        default=0,
        metadata={
            "help": "Threads of torch's CPU operations (torch.set_num_threads); 0 keeps torch's default of one per "
            "core. 1 avoids the slowdown of several spinning OpenMP threads on a CPU shared with other jobs, and "
            "costs little when the operations are small. No effect on GPU operations."
        },
    )

    def __post_init__(self):
        if self.torch_threads < 0:
            raise ValueError(
                f"--torch_threads must be 0 (torch's default) or a positive count, got {self.torch_threads}."
            )

    def apply(self) -> None:
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        logger.info(f"torch uses {torch.get_num_threads()} CPU thread(s).")


def parse_keep(text: str) -> float | int:
    """
    Read `--keep`: an integer is a row count, a number with a decimal point or exponent a fraction.

    Example:
        >>> parse_keep("0.7"), parse_keep("500"), parse_keep("1.0")
        (0.7, 500, 1.0)
    """
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"--keep {text!r} is neither a fraction such as 0.7 nor a row count such as 500."
        ) from None


def check_keep(keep: float | int, num_rows: int) -> int:
    """Return the number of rows that `keep` means; raise before training when it is out of range."""
    try:
        return keep_count(keep, num_rows)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Invalid --keep for a training set of {num_rows} rows: {error}") from error


def setup_logging(log_level: int, is_main_process: bool = True) -> None:
    """
    Send the recipe's and hf_moso's messages to stdout, and set transformers and datasets to `log_level`.

    The main process logs at INFO; the other processes of a multi-process run log at `log_level`
    (`TrainingArguments.get_process_log_level()`, WARNING by default), so that each message appears once. A script
    may configure logging; the library modules only create loggers.
    """
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO if is_main_process else log_level,
    )
    hf_logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)


def parse_recipe_arguments(data_arguments: type, model_arguments: type, defaults: dict, description: str) -> tuple:
    """
    Parse the command line of a recipe, then set up logging, the torch threads and the seed.

    The recipe gives its own data and model argument classes; the scoring, thread, pruning and training arguments
    are shared. `defaults` replace the defaults of the training and thread arguments.

    Returns `(data, model, scoring, threads, pruning, training)` argument objects.
    """
    argument_classes = [data_arguments, model_arguments, ScoringArguments, ThreadArguments, PruningArguments]
    parser = HfArgumentParser(
        argument_classes + [RecipeTrainingArguments],
        usage=USAGE,
        description=description,
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(**defaults)
    arguments = parser.parse_args_into_dataclasses()

    thread_arguments, training_arguments = arguments[3], arguments[-1]
    setup_logging(training_arguments.get_process_log_level(), training_arguments.should_log)
    thread_arguments.apply()
    set_seed(training_arguments.seed)
    return tuple(arguments)


def compute_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy of the arg-max class, for `Trainer(compute_metrics=...)` (works offline, unlike `evaluate.load`)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == prediction.label_ids))}


def sample_rows(dataset: Dataset, max_rows: int | None, seed: int) -> Dataset:
    """Return `max_rows` rows of `dataset` drawn at random with `seed`, kept in their original order."""
    if max_rows is None or max_rows >= len(dataset):
        return dataset
    if max_rows < 2:
        raise ValueError(
            f"--max_train_rows must be at least 2 (MoSo compares each row with the others), got {max_rows}."
        )
    positions = np.random.default_rng(seed).choice(len(dataset), size=max_rows, replace=False)
    return dataset.select(np.sort(positions))


def class_counts(dataset: Dataset, label_column: str) -> dict[str, int]:
    """Rows per class, keyed by class name when the column is a `ClassLabel`, in class order."""
    feature = dataset.features[label_column]
    labels = np.asarray(dataset[label_column])
    if isinstance(feature, ClassLabel):
        counts = np.bincount(labels, minlength=feature.num_classes) if labels.size else np.zeros(feature.num_classes)
        return {name: int(count) for name, count in zip(feature.names, counts)}
    values, counts = np.unique(labels, return_counts=True)
    return {str(value): int(count) for value, count in zip(values, counts)}


@dataclass
class RunSummary:
    """Outcome of a recipe run, as printed and as written to `moso_summary.json`."""

    rows_before: int
    rows_after: int
    keep: float | int
    class_balanced: bool
    class_counts_before: dict[str, int]
    class_counts_after: dict[str, int]
    score_min: float
    score_max: float
    train_seconds: float
    score_seconds: float
    pruned_dataset_dir: str
    eval_accuracy: float | None = None

    def to_text(self) -> str:
        width = max(len("class"), *(len(name) for name in self.class_counts_before))
        mode = "class-balanced" if self.class_balanced else "global"
        lines = [
            f"MoSo pruning ({mode}, keep={self.keep}): {self.rows_before} rows before, {self.rows_after} rows after "
            f"({100.0 * self.rows_after / self.rows_before:.1f}% kept)",
            f"{'class':<{width}}  {'before':>7}  {'after':>7}",
        ]
        for name, before in self.class_counts_before.items():
            lines.append(f"{name:<{width}}  {before:>7}  {self.class_counts_after.get(name, 0):>7}")
        lines.append(f"moso_score: min {self.score_min:.6g}, max {self.score_max:.6g}")
        lines.append(f"time: train {self.train_seconds:.1f} s, score {self.score_seconds:.1f} s")
        if self.eval_accuracy is not None:
            lines.append(f"evaluation accuracy of the trained model: {self.eval_accuracy:.4f}")
        lines.append(f"pruned dataset saved to {self.pruned_dataset_dir}")
        return "\n".join(lines)


def prune_and_save(
    dataset: Dataset,
    scores: np.ndarray,
    arguments: PruningArguments,
    output_dir: str,
    label_column: str,
    train_seconds: float,
    score_seconds: float,
    eval_accuracy: float | None = None,
    write: bool = True,
) -> RunSummary:
    """
    Prune `dataset` by `scores`, save the kept rows with `save_to_disk`, print the summary and write it as JSON.

    The saved dataset contains the kept rows of `dataset` in their original order, every column unchanged, plus the
    float64 `moso_score` column. With `write=False` (every process but the main one) nothing is saved or printed.
    """
    pruned = prune_dataset(
        dataset, scores, arguments.keep_value, class_balanced=arguments.class_balanced, label_column=label_column
    )
    folder = arguments.pruned_dataset_dir or os.path.join(output_dir, "pruned_dataset")
    if write:
        pruned.save_to_disk(folder)

    summary = RunSummary(
        rows_before=len(dataset),
        rows_after=len(pruned),
        keep=arguments.keep_value,
        class_balanced=arguments.class_balanced,
        class_counts_before=class_counts(dataset, label_column),
        class_counts_after=class_counts(pruned, label_column),
        score_min=float(np.min(scores)),
        score_max=float(np.max(scores)),
        train_seconds=train_seconds,
        score_seconds=score_seconds,
        pruned_dataset_dir=folder,
        eval_accuracy=eval_accuracy,
    )
    if write:
        with open(os.path.join(output_dir, SUMMARY_NAME), "w", encoding="utf-8") as stream:
            json.dump(asdict(summary), stream, indent=2)
        print(summary.to_text(), flush=True)
    return summary


def train_score_and_prune(
    trainer: MoSoTrainer, dataset: Dataset, arguments: PruningArguments, label_column: str
) -> RunSummary:
    """
    Train with `trainer`, save the model, evaluate it when it has an evaluation set, score every training row and
    prune `dataset` (the training rows before tokenization or other preprocessing, in the same order). Under
    several processes every process scores its share of the rows and the main process alone writes the results.
    """
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trainer.save_model()

    eval_accuracy = None
    if trainer.eval_dataset is not None:
        eval_accuracy = trainer.evaluate()["eval_accuracy"]

    # Scores follow the row order of the training rows, which is also the order of `dataset`.
    start = time.perf_counter()
    scores = trainer.compute_moso_scores()
    score_seconds = time.perf_counter() - start

    summary = prune_and_save(
        dataset,
        scores,
        arguments,
        trainer.args.output_dir,
        label_column=label_column,
        train_seconds=train_seconds,
        score_seconds=score_seconds,
        eval_accuracy=eval_accuracy,
        write=trainer.is_world_process_zero(),
    )

    # Close the process group before the interpreter exits, because an open gloo group can abort the process.
    trainer.accelerator.end_training()
    return summary
