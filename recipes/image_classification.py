#!/usr/bin/env python
"""
Prune an image classification dataset with MoSo.

A small convolutional network is trained from scratch with `MoSoTrainer`, which records weight snapshots while it
trains. Every training image is then scored, the highest-scoring images are kept, and the kept rows (columns
`image`, `label` and the float64 `moso_score`) are saved with `Dataset.save_to_disk`.

Data, one of:
- the 1797 handwritten 8x8 digits that ship inside scikit-learn (default, offline);
- `--mnist_dir`: a folder of MNIST idx files (`train-images-idx3-ubyte.gz` and the labels, or the `t10k-` files);
- `--dataset_name`: a dataset of the Hugging Face Hub with an image column and a class column.

A fraction of the rows (`--validation_fraction`) is held out, stratified by class, to report the accuracy of the
trained model; the rest is the training set that is scored and pruned.

Example:
    python recipes/image_classification.py --output_dir outputs/digits
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset, load_dataset
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import logging

from data import ensure_class_label, load_digits_dataset, load_mnist
from hf_moso import MoSoTrainer
from moso_run import check_keep, compute_accuracy, parse_recipe_arguments, sample_rows, train_score_and_prune


logger = logging.get_logger(__name__)

# Defaults of this recipe that differ from those of `MoSoConfig` and the other argument classes; `--help` shows them.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/digits",
    "num_train_epochs": 15.0,
    "learning_rate": 2e-3,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 256,
    "moso_batch_size": 8,
    "save_strategy": "no",
    "logging_strategy": "epoch",
    # The network is small, so its operations gain little from several threads.
    "torch_threads": 1,
}


@dataclass
class DataArguments:
    """Source of the images and choice of the rows."""

    _argument_group_name = "Data"

    mnist_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of MNIST idx files (train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz, or the "
            "t10k- files of the test set). When not given, the scikit-learn digits are used."
        },
    )
    mnist_split: str | None = field(
        default=None,
        metadata={
            "help": "MNIST split to read from --mnist_dir: train or test. When not given: train when its files are "
            "present, else test."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset with an image column and a class column, for example ylecun/mnist."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on and prune."})
    image_column: str = field(default="image", metadata={"help": "Image column of --dataset_name."})
    label_column: str = field(default="label", metadata={"help": "Class column of --dataset_name."})
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Resize every image to this many pixels square. Default: keep the size, which then must be the "
            "same for all images."
        },
    )
    validation_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Fraction of the rows held out (stratified by class, shuffled with --seed) to report accuracy; "
            "0 trains on and prunes every row."
        },
    )
    max_train_rows: int | None = field(
        default=None,
        metadata={"help": "Use only this many training rows, drawn at random with --seed (for quick runs)."},
    )

    def __post_init__(self):
        if self.mnist_dir is not None and self.dataset_name is not None:
            raise ValueError("Give either --mnist_dir or --dataset_name, not both.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction must be in [0, 1), got {self.validation_fraction}.")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be a positive number of pixels, got {self.image_size}.")


@dataclass
class ModelArguments:
    """Size of the convolutional network."""

    _argument_group_name = "Model"

    hidden_channels: int = field(
        default=32,
        metadata={"help": "Channels of the first two convolutions; the third has twice as many."},
    )


class SmallCNNConfig(PreTrainedConfig):
    """
    Configuration of `SmallCNNForImageClassification`.

    Args:
        num_channels: channels of the input images (1 for grayscale, 3 for RGB).
        hidden_channels: channels of the first two convolutions; the third has twice as many.
        kwargs: `PreTrainedConfig` arguments, among them `id2label`/`label2id` or `num_labels`.
    """

    model_type = "moso_small_cnn"

    def __init__(self, num_channels: int = 1, hidden_channels: int = 32, **kwargs):
        self.num_channels = num_channels
        self.hidden_channels = hidden_channels
        super().__init__(**kwargs)


class SmallCNNForImageClassification(PreTrainedModel):
    """
    Three 3x3 convolutions with batch norm and ReLU (a 2x2 max pooling after the second), average pooling to 4x4
    and a linear classifier. Images of any size of at least 2x2 pixels fit.

    The class name ends in `ForImageClassification`, so transformers sets `loss_type` and hf_moso computes the loss
    of every row of a batch from one forward pass.
    """

    config_class = SmallCNNConfig
    main_input_name = "pixel_values"

    def __init__(self, config: SmallCNNConfig):
        super().__init__(config)
        channels = config.hidden_channels
        self.features = nn.Sequential(
            nn.Conv2d(config.num_channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(2 * channels * 16, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        # He initialization suits ReLU networks trained from scratch better than the small normal init of
        # pretrained transformers.
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        logits = self.classifier(self.features(pixel_values).flatten(1))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


def load_images(arguments: DataArguments) -> tuple[Dataset, str]:
    """Return the dataset named by the arguments and a short description of its source."""
    if arguments.mnist_dir is not None:
        return load_mnist(arguments.mnist_dir, arguments.mnist_split), f"MNIST idx files in {arguments.mnist_dir}"
    if arguments.dataset_name is not None:
        dataset = load_dataset(arguments.dataset_name, arguments.dataset_config_name, split=arguments.train_split)
        if arguments.image_column not in dataset.column_names:
            raise ValueError(
                f"Image column {arguments.image_column!r} not found in {arguments.dataset_name}; its columns are "
                f"{dataset.column_names}. Name it with --image_column."
            )
        dataset = ensure_class_label(dataset, arguments.label_column)
        return dataset, f"{arguments.dataset_name} ({arguments.train_split})"
    return load_digits_dataset(), "scikit-learn digits"


def image_mode(dataset: Dataset, image_column: str) -> str:
    """Return `L` when the first image is 8-bit grayscale or black and white, else `RGB`, the mode for all images."""
    return "L" if dataset[0][image_column].mode in ("1", "L", "LA") else "RGB"


def to_pixel_values(dataset: Dataset, image_column: str, label_column: str, mode: str, size: int | None) -> Dataset:
    """
    Turn images into float32 tensors in [0, 1] of shape (channels, height, width) named `pixel_values`, next to
    `labels`, for the model.

    Raises:
        ValueError: when the images differ in size and `size` is not given.
    """

    shapes = set()

    def convert(batch):
        images = []
        for image in batch[image_column]:
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size, size))
            array = np.asarray(image, dtype=np.float32) / 255.0
            images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        shapes.update(array.shape for array in images)
        return {"pixel_values": images, "labels": batch[label_column]}

    # The cache is bypassed so that `convert` runs on every image and collects every shape.
    converted = dataset.map(
        convert,
        batched=True,
        remove_columns=dataset.column_names,
        load_from_cache_file=False,
        desc="Converting images to pixel values",
    )
    if len(shapes) > 1:
        raise ValueError(f"The images have different sizes {sorted(shapes)}; resize them with --image_size.")
    return converted.with_format("torch")


def main():
    data_arguments, model_arguments, scoring_arguments, _, pruning_arguments, training_arguments = (
        parse_recipe_arguments(DataArguments, ModelArguments, TRAINING_DEFAULTS, __doc__)
    )

    # Data: the training rows to prune, and the held-out rows to evaluate on.
    dataset, source = load_images(data_arguments)
    label_column = "label" if data_arguments.dataset_name is None else data_arguments.label_column
    image_column = "image" if data_arguments.dataset_name is None else data_arguments.image_column
    eval_dataset = None
    if data_arguments.validation_fraction > 0:
        split = dataset.train_test_split(
            test_size=data_arguments.validation_fraction,
            seed=training_arguments.seed,
            stratify_by_column=label_column,
        )
        dataset, eval_dataset = split["train"], split["test"]
    dataset = sample_rows(dataset, data_arguments.max_train_rows, training_arguments.seed)
    check_keep(pruning_arguments.keep_value, len(dataset))
    logger.info(
        f"Data: {source}, {len(dataset)} training rows"
        + (f", {len(eval_dataset)} held-out rows" if eval_dataset is not None else "")
    )

    mode = image_mode(dataset, image_column)
    train_pixels = to_pixel_values(dataset, image_column, label_column, mode, data_arguments.image_size)
    eval_pixels = None
    if eval_dataset is not None:
        eval_pixels = to_pixel_values(eval_dataset, image_column, label_column, mode, data_arguments.image_size)

    # Model: trained from scratch.
    class_names = dataset.features[label_column].names
    config = SmallCNNConfig(
        num_channels=1 if mode == "L" else 3,
        hidden_channels=model_arguments.hidden_channels,
        id2label=dict(enumerate(class_names)),
        label2id={name: index for index, name in enumerate(class_names)},
        problem_type="single_label_classification",
    )
    model = SmallCNNForImageClassification(config)
    logger.info(f"Model: {type(model).__name__}, {model.num_parameters():,} parameters")

    # Training: MoSoTrainer records the weight snapshots that scoring uses.
    trainer = MoSoTrainer(
        model=model,
        args=training_arguments,
        train_dataset=train_pixels,
        eval_dataset=eval_pixels,
        compute_metrics=compute_accuracy,
        scoring_backend=scoring_arguments.create_backend(),
    )
    train_score_and_prune(trainer, dataset, pruning_arguments, label_column)


if __name__ == "__main__":
    main()
