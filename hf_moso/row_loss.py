"""Per-row losses: the loss the model would report for each row of a batch on its own."""

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F


IGNORE_INDEX = -100

# Loss types of transformers models (`PreTrainedModel.loss_type`) whose loss has a closed per-row form here.
SEQUENCE_LOSS_TYPES = {
    "ForSequenceClassification",
    "ForImageClassification",
    "ForAudioClassification",
    "ForVideoClassification",
}
TOKEN_LOSS_TYPES = {"ForTokenClassification", "ForMaskedLM"}
SHIFTED_TOKEN_LOSS_TYPES = {"ForCausalLM", "ForConditionalGeneration"}


def count_rows(batch: Mapping) -> int:
    """Return the number of rows of `batch`: the first dimension of its first tensor with one."""
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(
        f"The batch contains no tensor with a batch dimension (keys: {sorted(batch)}). Check the data collator."
    )


def _row(batch: Mapping, index: int) -> dict:
    """Restrict `batch` to row `index`, keeping the batch dimension (padding stays masked as it was)."""
    size = count_rows(batch)
    row = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size:
            row[key] = value[index : index + 1]
        else:
            row[key] = value
    return row


def _loss_of(outputs) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, (tuple, list)) and outputs and torch.is_tensor(outputs[0]):
        loss = outputs[0]
    if loss is None:
        raise ValueError(
            "The model returned no loss. MoSo needs the model to compute its loss from the labels in the batch: "
            "check that the dataset has a label column the model accepts (`label` or `labels` for transformers "
            "models) and that the data collator passes it on."
        )
    return loss.reshape(())


def _logits_of(outputs) -> torch.Tensor | None:
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    return getattr(outputs, "logits", None)


def _sequence_row_losses(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    num_labels = config.num_labels
    problem_type = config.problem_type
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"

    if problem_type == "regression":
        if num_labels == 1:
            return (logits.reshape(-1).float() - labels.reshape(-1).float()) ** 2
        return ((logits.float() - labels.float()) ** 2).reshape(logits.shape[0], -1).mean(dim=1)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, num_labels).float(), labels.reshape(-1), reduction="none")
    if problem_type == "multi_label_classification":
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        return losses.reshape(logits.shape[0], -1).mean(dim=1)
    raise ValueError(f"Unknown `problem_type`={problem_type!r} in the model config.")


def _token_row_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    if shift:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    token_losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(labels.shape)
    counted = (labels != IGNORE_INDEX).sum(dim=-1)

    # A row without any counted token has loss 0/0, as the model's own mean reduction gives it.
    return token_losses.sum(dim=-1) / counted


def has_closed_form(model: nn.Module) -> bool:
    """Return whether `row_losses` computes all rows of a batch in one forward pass for `model`."""
    if "_loss_function" in vars(model):
        return False
    loss_type = getattr(model, "loss_type", None)
    return loss_type in SEQUENCE_LOSS_TYPES | TOKEN_LOSS_TYPES | SHIFTED_TOKEN_LOSS_TYPES


def row_losses(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """
    Compute l(z) for every row z of `batch`: the loss the model reports for that row alone, shape `(B,)`.

    For transformers classification, token-classification, masked and causal language models the losses come
    from one forward pass over the whole batch, with the model's own reduction applied per row (mean over the
    row's labelled tokens for token losses, ignoring `-100`), so padding and batch size do not change them. Any
    other model runs one forward pass per row and its own `loss`, which is exact for every model whose rows do
    not interact (true in eval mode).

    Loss scaling that `Trainer` applies during training (gradient accumulation, averaging tokens across devices)
    never enters here.
    """
    if has_closed_form(model):
        outputs = model(**batch)
        logits = _logits_of(outputs)
        labels = batch.get("labels")
        if logits is not None and labels is not None:
            loss_type = model.loss_type
            if loss_type in SEQUENCE_LOSS_TYPES:
                return _sequence_row_losses(logits, labels, model.config)
            return _token_row_losses(logits, labels, shift=loss_type in SHIFTED_TOKEN_LOSS_TYPES)

    return single_row_losses(model, batch)


def batch_rows(batch: Mapping) -> list[dict]:
    """Split `batch` into batches of one row each, in order, keeping the batch dimension."""
    return [_row(batch, index) for index in range(count_rows(batch))]


def single_row_losses(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """Compute l(z) for every row z of `batch` with one forward pass per row: the model's own loss, shape `(B,)`."""
    return torch.stack([_loss_of(model(**row)) for row in batch_rows(batch)])
