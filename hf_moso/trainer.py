"""`MoSoTrainer`: a `transformers.Trainer` that records MoSo snapshots and scores training rows."""

import os

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .config import MoSoConfig
from .dataset import SCORE_COLUMN, add_moso_scores, prune_dataset, resolve_label_column
from .distributed import process_row_shard
from .labels import check_labels
from .parameters import select_parameters
from .scoring import GradientStatisticsBackend, PartialResults, PerLayerBackend, compute_moso_scores
from .snapshots import SnapshotRecorder, read_manifest


logger = logging.get_logger(__name__)


class MoSoTrainer(Trainer):
    """
    A [`~transformers.Trainer`] that records weight snapshots and learning rates while it trains, then scores every
    training row with MoSo (Moving-one-Sample-out, Tan et al., NeurIPS 2023) and prunes the lowest-scoring rows.

    Training is unchanged: the trainer only adds a callback that saves the weights before the planned optimizer
    steps and the learning rate each of those steps applied (see [`MoSoConfig`]).

    Args:
        args ([`MoSoConfig`], *optional*): training arguments plus the `moso_` fields. Defaults to
            `MoSoConfig(output_dir="trainer_output")`.
        scoring_backend ([`GradientStatisticsBackend`], *optional*): how per-row gradient statistics are computed.
            Defaults to [`PerLayerBackend`], which computes them layer by layer; `PerSampleGradientBackend` is the
            slower row-at-a-time reference.
        row_loss_function (`Callable[[nn.Module, dict], torch.Tensor]`, *optional*): the loss of every row of a
            batch alone, shape `(B,)`. It serves models whose per-row loss has no batched form in `row_losses`,
            which are the models other than transformers classification and language models. It is passed to the
            default backend, which checks it against the model's own loss on the first batch. Without it such
            models score one row per forward pass.
        All other arguments are those of `Trainer`.

    Example:
        ```python
        trainer = MoSoTrainer(model=model, args=MoSoConfig(output_dir="out"), train_dataset=train)
        trainer.train()
        pruned = trainer.prune(keep=0.7, class_balanced=True)
        ```
    """

    def __init__(
        self,
        model=None,
        args: MoSoConfig | None = None,
        *trainer_args,
        scoring_backend=None,
        row_loss_function=None,
        **kwargs,
    ):
        # Arguments: MoSo fields live on the config, as TRL does for its trainers.
        if args is None:
            args = MoSoConfig(output_dir="trainer_output")
        elif not isinstance(args, MoSoConfig):
            kind = "TrainingArguments" if isinstance(args, TrainingArguments) else type(args).__name__
            raise TypeError(
                f"`args` must be a MoSoConfig, got {kind}. MoSoConfig accepts every TrainingArguments field, so "
                "build it with the same keywords: MoSoConfig(output_dir=..., ...)."
            )
        if scoring_backend is not None and row_loss_function is not None:
            raise ValueError(
                "Pass `row_loss_function` to the backend given as `scoring_backend` (for example "
                "`PerLayerBackend(row_loss_function=...)`) instead of to the trainer."
            )
        super().__init__(model, args, *trainer_args, **kwargs)
        self._check_process_count()

        # Parameter patterns are checked now, so that a typo fails before training rather than after it.
        if args.moso_parameters is not None and self.model is not None:
            select_parameters(self.model, args.moso_parameters)

        # Scoring: the backend and a cache of scores per dataset fingerprint and snapshot set.
        if scoring_backend is None:
            scoring_backend = PerLayerBackend(row_loss_function=row_loss_function)
        self.scoring_backend: GradientStatisticsBackend = scoring_backend
        self._score_cache: dict[tuple, np.ndarray] = {}

        # Callbacks: the snapshot recorder.
        self.snapshot_recorder = SnapshotRecorder(
            folder=args.moso_snapshot_folder,
            num_snapshots=args.moso_num_snapshots,
            snapshot_steps=args.moso_snapshot_steps,
        )
        self.add_callback(self.snapshot_recorder)

    def _check_process_count(self) -> None:
        """
        Raise when the script was launched as several processes but the training arguments run as one process.

        On a machine without a GPU, `accelerate launch --multi_gpu` starts the processes and their process group, but
        `TrainingArguments` without `use_cpu=True` runs each of them alone: every process would train on all rows and
        write the same files.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        num_processes = torch.distributed.get_world_size()
        if num_processes > 1 and self.args.world_size == 1:
            raise ValueError(
                f"This script runs as {num_processes} processes, but the training arguments see 1 process "
                f"(parallel_mode={self.args.parallel_mode.value}, device {self.args.device}), so each process would "
                "train on every row alone. On CPUs set `use_cpu=True` (`--use_cpu` for scripts that parse "
                "TrainingArguments); on GPUs check that each process sees its device."
            )

    def _scoring_dataloader(self, dataset) -> DataLoader:
        """Batches of `dataset` in row order, with the columns the model does not accept removed."""
        collator = self.data_collator
        if isinstance(dataset, Dataset):
            dataset = self._remove_unused_columns(dataset, description="MoSo scoring")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="MoSo scoring")
        return DataLoader(
            dataset,
            batch_size=self.args.moso_scoring_batch_size,
            sampler=SequentialSampler(dataset),
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            drop_last=False,
        )

    def _resolve_dataset(self, dataset):
        dataset = self.train_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("No dataset to score: pass `dataset=`, or give the trainer a `train_dataset`.")
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                "MoSo scores every row of a dataset with a known length; got an iterable dataset. Materialize it, "
                "for example with `Dataset.from_generator`."
            )
        if len(dataset) == 0:
            raise ValueError("The dataset to score is empty. Pass a dataset with at least 2 rows.")
        return dataset

    def compute_moso_scores(self, dataset=None, partial_results: str | PartialResults | None = None) -> np.ndarray:
        r"""
        Compute the MoSo score of every row of `dataset` (default: the training dataset).

            M(z) = (1/T) * sum_t eta_t * grad L(S\z, w_t) . grad l(z, w_t)

        over the recorded snapshots w_t with the learning rates eta_t the optimizer applied at them (per parameter
        group), where l is the model's own loss on the row alone and grad L(S\z) the mean gradient of the other
        rows. Gradients are taken in eval mode over the parameters selected by `moso_parameters`. Higher scores
        mark rows whose removal would hurt more.

        Args:
            dataset: the rows to score; defaults to the training dataset.
            partial_results: a folder (or a `PartialResults`) where each finished piece of the computation is saved
                atomically, so that a call interrupted at any point, by SIGKILL too, resumes from the last piece
                and returns the same scores as an uninterrupted call. A folder keys the pieces by the dataset's
                `_fingerprint` and `moso_batch_size`, so it needs a `datasets.Dataset`. The folder is kept
                afterwards; delete it once the scores are stored.

        Under several processes (`accelerate launch`, `torchrun`) every process must call this method. Each scores
        a contiguous run of whole batches of `moso_batch_size` rows, and every process returns all the scores,
        equal to those of one process up to floating-point rounding. An FSDP2 model is scored through an unsharded
        copy on each process. Forward passes run under the autocast that Accelerate applies for `bf16` or `fp16`
        (Accelerate 1.16 applies none for `fp16` on CPU).

        Returns:
            `numpy.ndarray` of float64, one score per row in dataset row order, whatever order training visited the
            rows in and whatever columns the trainer removed.

        Raises:
            ValueError: on an empty dataset, missing snapshots, or a row whose loss or gradient is not finite (the
                message names the row positions).
        """
        dataset = self._resolve_dataset(dataset)
        folder = self.args.moso_snapshot_folder
        if isinstance(dataset, Dataset):
            # Invalid class ids would fail inside the loss, and on CUDA only as a device-side assertion.
            label_name = next((name for name in ("labels", "label") if name in dataset.column_names), None)
            if label_name is not None:
                check_labels(dataset, label_name, self.accelerator.unwrap_model(self.model))

        # Only the main process writes snapshots, so the others read the manifest once it is done.
        self.accelerator.wait_for_everyone()
        manifest = read_manifest(folder)

        if isinstance(partial_results, (str, os.PathLike)):
            if not isinstance(dataset, Dataset):
                raise TypeError(
                    f"Resumable scoring identifies the rows by a `datasets.Dataset` fingerprint, got "
                    f"{type(dataset).__name__}. Convert the rows with `Dataset.from_dict`, or pass a `PartialResults` "
                    "with a fingerprint of your own."
                )
            partial_results = PartialResults(
                os.fspath(partial_results),
                dataset._fingerprint,
                layout={"batch_size": self.args.moso_scoring_batch_size},
            )

        model = self.accelerator.unwrap_model(self.model)
        parameters = select_parameters(model, self.args.moso_parameters, manifest.parameter_groups)

        # Scores depend on the rows, the snapshots and the scored parameters, so all three key the cache.
        cache_key = None
        if isinstance(dataset, Dataset):
            cache_key = (
                dataset._fingerprint,
                tuple(snapshot.sha256 for snapshot in manifest.snapshots),
                tuple(parameters.names),
            )
            if cache_key in self._score_cache:
                return self._score_cache[cache_key].copy()

        # With several processes, each scores its own run of whole batches, without the repeated rows that
        # `even_batches` or `DistributedSampler` would add. The engine adds up and gathers the results.
        row_indices = None
        local_rows = dataset
        if self.accelerator.num_processes > 1:
            row_indices = process_row_shard(
                len(dataset),
                self.args.moso_scoring_batch_size,
                num_processes=self.accelerator.num_processes,
                process_index=self.accelerator.process_index,
            )
            local_rows = dataset.select(row_indices) if isinstance(dataset, Dataset) else Subset(dataset, row_indices)
        dataloader = self._scoring_dataloader(local_rows)
        hide_progress = self.args.disable_tqdm or not self.is_local_process_zero()

        def batches():
            for batch in logging.tqdm(dataloader, desc="MoSo rows", leave=False, disable=hide_progress):
                yield self._prepare_inputs(batch)

        # Forward passes run in the training's mixed precision (bf16 or fp16 autocast, none without), the same as
        # a model prepared by Accelerate. Losses are never scaled: the backends differentiate their own row losses.
        with self.accelerator.autocast():
            scores = compute_moso_scores(
                model,
                batches,
                num_rows=len(dataset),
                snapshot_folder=folder,
                snapshots=manifest.snapshots,
                parameters=parameters,
                backend=self.scoring_backend,
                show_progress=not hide_progress,
                partial_results=partial_results,
                row_indices=row_indices,
            )
        if cache_key is not None:
            self._score_cache[cache_key] = scores.copy()
        return scores

    def score_dataset(self, dataset: Dataset | None = None) -> Dataset:
        """
        Return `dataset` (default: the training dataset) with a float64 `moso_score` column, every row kept.

        Example:
            ```python
            scored = trainer.score_dataset()
            kept = scored.filter(lambda row: row["moso_score"] > 0.0)
            ```
        """
        dataset = self._resolve_dataset(dataset)
        self._require_datasets_dataset(dataset)
        return add_moso_scores(dataset, self.compute_moso_scores(dataset))

    def prune(
        self,
        keep: float | int,
        class_balanced: bool = False,
        label_column: str | None = None,
        dataset: Dataset | None = None,
        allow_empty_classes: bool = False,
    ) -> Dataset:
        """
        Keep the highest-scoring rows of `dataset` (default: the training dataset).

        Args:
            keep: fraction of rows to keep, a float in (0, 1], or a number of rows, an int.
            class_balanced: give each class a quota proportional to its size (largest-remainder rounding) and fill
                it only with that class's best rows.
            label_column: the class column for `class_balanced`; defaults to `label` or `labels`.
            dataset: the dataset to prune instead of the training dataset.
            allow_empty_classes: with `class_balanced`, drop a class whose quota rounds to 0 rows with a warning,
                instead of raising a `ValueError`.

        Returns:
            A `datasets.Dataset` of the kept rows, in their original order, with every original column and feature
            unchanged plus a float64 `moso_score` column. Ties are broken by row position: the earlier row is kept.
        """
        dataset = self._resolve_dataset(dataset)
        self._require_datasets_dataset(dataset)
        if class_balanced:
            # Check the label column before the costly scoring pass.
            label_column = resolve_label_column(dataset, label_column)
        return prune_dataset(
            dataset,
            self.compute_moso_scores(dataset),
            keep,
            class_balanced=class_balanced,
            label_column=label_column,
            allow_empty_classes=allow_empty_classes,
        )

    @staticmethod
    def _require_datasets_dataset(dataset) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"A scored or pruned dataset is built from a `datasets.Dataset`, got {type(dataset).__name__}. Use "
                "`compute_moso_scores` for other datasets, or convert with `Dataset.from_dict`."
            )
        if SCORE_COLUMN in dataset.column_names:
            raise ValueError(
                f"The dataset already has a {SCORE_COLUMN!r} column. Remove it with "
                f"`dataset.remove_columns({SCORE_COLUMN!r})` before scoring again."
            )

    def create_model_card(self, language=None, license=None, tags=None, **kwargs):
        # Models trained here are tagged so that the Hub lists them with other MoSo runs.
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        if "moso" not in tags:
            tags.append("moso")
        return super().create_model_card(language=language, license=license, tags=tags, **kwargs)
