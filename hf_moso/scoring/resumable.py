"""Statistics of one snapshot computed piece by piece, each piece saved in `PartialResults` as soon as it is done."""

import os
import time
from collections.abc import Iterator, Mapping

import numpy as np
from torch import nn
from transformers.utils import logging

from ..parameters import ScoredParameters
from ..row_loss import count_rows
from ..snapshots import Snapshot
from .base import BatchFactory, GradientStatistics, GradientStatisticsBackend, NonFiniteLossError
from .partial_results import PartialResults


logger = logging.get_logger(__name__)

# Test-only: seconds to sleep after each saved chunk of rows, so that a test can kill a job in the middle of a
# snapshot at a known point. Leave it unset in real jobs.
CHUNK_DELAY_VARIABLE = "HF_MOSO_TEST_CHUNK_DELAY_SECONDS"


class _ChunkBatches:
    """
    The batches of one chunk of rows, taken lazily from an iterator shared by all chunks of the pass.

    The chunk ends after the first batch that brings it to `chunk_rows` rows or more, or when the iterator ends.
    It can be iterated once, which is all a backend's `row_statistics` does.
    """

    def __init__(self, iterator: Iterator[Mapping], chunk_rows: int):
        self.iterator = iterator
        self.chunk_rows = chunk_rows
        self.rows = 0
        self.exhausted = False
        self._started = False

    def __call__(self):
        if self._started:
            raise RuntimeError(
                "The scoring backend iterated the batches of a chunk twice; resumable scoring passes each batch once. "
                "Score without partial results with this backend."
            )
        self._started = True
        return self._batches()

    def _batches(self):
        while self.rows < self.chunk_rows:
            batch = next(self.iterator, None)
            if batch is None:
                self.exhausted = True
                return
            self.rows += count_rows(batch)
            yield batch

    def drain(self) -> None:
        """Consume the batches of the chunk that the backend left unread."""
        if not self._started:
            self._started = True
        for _ in self._batches():
            pass


def _skip_rows(iterator: Iterator[Mapping], count: int, start: int) -> None:
    skipped = 0
    while skipped < count:
        batch = next(iterator, None)
        if batch is None:
            raise RuntimeError(f"The batches ended before row {start + count} of a saved chunk of rows.")
        skipped += count_rows(batch)
    if skipped != count:
        raise RuntimeError(
            f"A saved chunk of rows ends at row {start + count}, inside a batch of this job; the batch size changed "
            "since the chunk was saved."
        )


def _chunk_delay() -> float:
    value = os.environ.get(CHUNK_DELAY_VARIABLE)
    return float(value) if value else 0.0


def resumable_statistics(
    model: nn.Module,
    batches: BatchFactory,
    num_rows: int,
    parameters: ScoredParameters,
    backend: GradientStatisticsBackend,
    snapshot: Snapshot,
    partial_results: PartialResults,
) -> GradientStatistics:
    """
    Compute the statistics of `snapshot` as `backend.compute` does, reusing and saving pieces in `partial_results`.

    Pass 1 (the gradient sum) is one piece. Pass 2 runs in chunks of `partial_results.chunk_rows` rows: a saved
    chunk is skipped (its batches are still read, but the model does not run on them), any other chunk is computed
    by `backend.row_statistics` and saved at once. Every row's numbers come from the same computation as in one
    uninterrupted pass, so the result is identical. The complete statistics are saved last, which replaces the
    pieces. The model must already hold the weights of `snapshot`.

    Raises:
        NonFiniteLossError: naming rows by their position in `batches()` order.
    """
    gradient_sum = partial_results.load_gradient_sum(snapshot, parameters.names)
    if gradient_sum is None:
        gradient_sum = backend.gradient_sum(model, batches, parameters)
        partial_results.save_gradient_sum(snapshot, parameters.names, gradient_sum)
    else:
        logger.info(f"Reusing the saved gradient sum of the snapshot of step {snapshot.step}.")
        gradient_sum = [total.to(tensor.device) for total, tensor in zip(gradient_sum, parameters.tensors)]
    gradient_mean = [total / num_rows for total in gradient_sum]

    delay = _chunk_delay()
    iterator = iter(batches())
    pieces: list[GradientStatistics] = []
    position = 0
    while position < num_rows:
        saved = partial_results.find_row_chunk(snapshot, position)
        if saved is not None:
            end, statistics = saved
            _skip_rows(iterator, end - position, position)
        else:
            chunk = _ChunkBatches(iterator, partial_results.chunk_rows)
            try:
                statistics = backend.row_statistics(model, chunk, parameters, gradient_mean)
            except NonFiniteLossError as error:
                raise NonFiniteLossError([position + row for row in error.rows], what=error.what) from error
            chunk.drain()
            if statistics.mean_dot.shape[0] != chunk.rows:
                raise RuntimeError(
                    f"The {backend.name} backend returned statistics of {statistics.mean_dot.shape[0]} rows for a "
                    f"chunk of {chunk.rows} rows."
                )
            if chunk.rows == 0:
                raise RuntimeError(f"The batches held {position} rows, expected {num_rows}.")
            partial_results.save_row_chunk(snapshot, position, statistics)
            if delay:
                time.sleep(delay)
        pieces.append(statistics)
        position += statistics.mean_dot.shape[0]

    if position != num_rows or next(iterator, None) is not None:
        raise RuntimeError(f"The batches held more rows than the {num_rows} expected.")
    statistics = GradientStatistics(
        mean_dot=np.concatenate([piece.mean_dot for piece in pieces]),
        squared_norm=np.concatenate([piece.squared_norm for piece in pieces]),
    )
    partial_results.save_statistics(snapshot, statistics)
    return statistics
