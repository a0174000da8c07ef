"""Forgetting events (Toneva et al., "An Empirical Study of Example Forgetting", ICLR 2019), counted during training."""

import time

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler
from transformers import TrainerCallback
from transformers.utils import logging

from .snapshot_selection import classification_logits_and_labels


logger = logging.get_logger(__name__)

FORGETTING_COLUMN = "forgetting_score"


def evenly_spaced_checks(max_steps: int, num_checks: int) -> list[int]:
    """
    Spread `num_checks` optimizer steps evenly over 1..`max_steps`, ending at the last step.

    Example:
        >>> evenly_spaced_checks(100, 4)
        [25, 50, 75, 100]
    """
    count = min(num_checks, max_steps)
    return [((index + 1) * max_steps) // count for index in range(count)]


class ForgettingCallback(TrainerCallback):
    """
    Count forgetting events of every training row while `Trainer` trains.

    A forgetting event of row z is a check at which the model classifies z wrongly after classifying it correctly
    at the check before. The score is the number of events. A row never classified correctly at any check gets
    `num_checks`, more than any row can reach (at most `num_checks // 2` events), because Toneva et al. rank rows
    that are never learned as the most forgotten. Higher means keep, as for MoSo.

    Row identity: Toneva et al. record correctness when the shuffled minibatch visits a row, which needs the row's
    index in every batch. `Trainer` drops every column the model's `forward` does not accept, an index column
    too, and draws a new permutation each epoch. So this callback instead recomputes the correctness of every row
    at chosen optimizer steps. At the end of each check step it runs the model in eval mode over the dataset of the
    training dataloader (already without the unused columns), with its collator and in row order. Rows are then
    identified by position, whatever sampler, shuffling or column removal training used. One check per epoch
    observes each row as often as the original per-visit count, and more checks resolve short runs better. Each
    check costs one forward pass over the training set without gradients; `check_seconds` adds up their time.

    Args:
        num_checks: number of checks spread evenly over the optimizer steps (the last at the final step).
            Ignored when `check_steps` is given.
        check_steps: explicit optimizer steps (counted from 1, as `TrainerState.global_step`) after which to check.
        batch_size: rows per forward pass of a check; defaults to `per_device_eval_batch_size`.

    Example:
        ```python
        forgetting = ForgettingCallback(num_checks=10)
        trainer = MoSoTrainer(model=model, args=args, train_dataset=train, callbacks=[forgetting])
        trainer.train()
        scores = forgetting.scores()
        ```
    """

    def __init__(self, num_checks: int = 10, check_steps: list[int] | None = None, batch_size: int | None = None):
        if isinstance(num_checks, bool) or not isinstance(num_checks, int) or num_checks < 2:
            raise ValueError(
                f"`num_checks` must be an int of at least 2 (an event needs two checks), got {num_checks!r}."
            )
        if check_steps is not None:
            check_steps = sorted(set(check_steps))
            if len(check_steps) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in check_steps):
                raise ValueError(
                    f"`check_steps` must list at least 2 optimizer steps counted from 1, got {check_steps!r}."
                )
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        self.num_checks = num_checks
        self.check_steps = check_steps
        self.batch_size = batch_size
        self.correct: list[np.ndarray] = []
        self.checked_steps: list[int] = []
        self.check_seconds = 0.0
        self._planned: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.check_steps is None:
            planned = evenly_spaced_checks(state.max_steps, self.num_checks)
        else:
            beyond = [step for step in self.check_steps if step > state.max_steps]
            if beyond:
                raise ValueError(
                    f"`check_steps` contains steps {beyond} beyond the last optimizer step ({state.max_steps})."
                )
            planned = self.check_steps
        if len(planned) < 2:
            raise ValueError(f"Training has {state.max_steps} optimizer step(s); counting forgetting needs at least 2.")
        self._planned = set(planned)
        self.correct, self.checked_steps, self.check_seconds = [], [], 0.0
        if state.global_step > 0:
            logger.warning(
                f"Resuming at step {state.global_step}: forgetting events are counted only from the checks after it."
            )

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if state.global_step not in self._planned:
            return
        if train_dataloader is None or not hasattr(train_dataloader, "dataset"):
            raise ValueError("Counting forgetting events needs the training dataloader, which the Trainer did not pass.")
        start = time.perf_counter()
        self.correct.append(self._check(model, train_dataloader, args.per_device_eval_batch_size))
        self.checked_steps.append(state.global_step)
        self.check_seconds += time.perf_counter() - start

    @torch.no_grad()
    def _check(self, model, train_dataloader, default_batch_size: int) -> np.ndarray:
        dataset = train_dataloader.dataset
        if not hasattr(dataset, "__len__"):
            raise TypeError("Forgetting events are counted per row, so the training dataset needs a known length.")
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size or default_batch_size,
            sampler=SequentialSampler(dataset),
            collate_fn=train_dataloader.collate_fn,
        )
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        correct = []
        try:
            for batch in loader:
                batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
                logits, labels = classification_logits_and_labels(model(**batch), batch)
                correct.append((logits.argmax(dim=-1) == labels).cpu().numpy())
        finally:
            model.train(was_training)
        return np.concatenate(correct) if correct else np.zeros(0, dtype=bool)

    def scores(self) -> np.ndarray:
        """
        Return the number of forgetting events of every training row, in dataset row order, as float64.

        Raises:
            ValueError: when fewer than 2 checks have run (train first).
        """
        if len(self.correct) < 2:
            raise ValueError(
                f"Only {len(self.correct)} correctness check(s) ran; forgetting needs at least 2. Train with this "
                "callback added to the Trainer first."
            )
        history = np.stack(self.correct)
        events = np.sum(history[:-1] & ~history[1:], axis=0).astype(np.float64)
        never_learned = ~history.any(axis=0)
        events[never_learned] = float(history.shape[0])
        return events
