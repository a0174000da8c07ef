"""Tiny models and datasets built inside the tests."""

import torch
from datasets import ClassLabel, Dataset, Features, Value
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_moso import MoSoConfig


def cpu_config(output_dir, **fields) -> MoSoConfig:
    """
    Build the `MoSoConfig` of a quick test run on CPU with seed 0 that writes to `output_dir`.

    The run writes no reports, checkpoints or progress bars. `fields` give the rest (batch size, epochs,
    snapshots...) and may override these settings.
    """
    quiet = {"report_to": "none", "save_strategy": "no", "disable_tqdm": True, "use_cpu": True, "seed": 0}
    return MoSoConfig(**{"output_dir": str(output_dir), **quiet, **fields})


def tiny_bert(num_labels: int = 3, seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def token_dataset(num_rows: int = 12, num_labels: int = 3, seed: int = 0, extra_column: bool = False) -> Dataset:
    """Rows of token ids of lengths 3..9 (so batches need padding) with a class label."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "label": []}
    for index in range(num_rows):
        length = 3 + int(torch.randint(0, 7, (1,), generator=generator))
        ids = torch.randint(1, 50, (length,), generator=generator).tolist()
        rows["input_ids"].append(ids)
        rows["label"].append(index % num_labels)
    features = {"input_ids": [Value("int64")], "label": ClassLabel(num_classes=num_labels)}
    if extra_column:
        rows["text"] = [f"row {index}" for index in range(num_rows)]
        features["text"] = Value("string")
    return Dataset.from_dict(rows, features=Features(features))


class TinyCNN(nn.Module):
    """A small convolutional classifier with batch norm and dropout, returning a loss like transformers models."""

    def __init__(self, num_classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(4 * 4 * 4, num_classes)

    def forward(self, pixel_values, labels=None):
        hidden = torch.relu(self.norm(self.conv(pixel_values)))
        hidden = nn.functional.max_pool2d(hidden, 2).flatten(1)
        logits = self.head(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def image_dataset(num_rows: int = 12, num_classes: int = 3, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_rows, 1, 8, 8, generator=generator)
    labels = [index % num_classes for index in range(num_rows)]
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "label": labels}).with_format("torch")


def pad_collator(features: list[dict]) -> dict:
    """Pad `input_ids` with 0 to the longest row of the batch and build the attention mask."""
    longest = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.zeros(len(features), longest, dtype=torch.long)
    attention_mask = torch.zeros(len(features), longest, dtype=torch.long)
    for index, feature in enumerate(features):
        ids = torch.as_tensor(feature["input_ids"])
        input_ids[index, : len(ids)] = ids
        attention_mask[index, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in features[0]:
        batch["labels"] = torch.tensor([int(feature["label"]) for feature in features])
    return batch
