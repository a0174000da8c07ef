"""
Readers of the labelled datasets that the recipes and benchmarks use, each returned as a `datasets.Dataset` whose
label column is a `ClassLabel` carrying the class names.

- Sentence files with one `<label> <sentence>` row per line: SST-2 (`stsa.binary.train/dev/test`) and TREC
  (`TREC.train.all`/`TREC.test.all`). Columns: `text` (string), `label` (ClassLabel).
- MNIST in the idx format, gzip-compressed or not (`t10k-images-idx3-ubyte.gz`, ...). Columns: `image` (Image),
  `label` (ClassLabel).
- The 8x8 digits that ship inside scikit-learn (`sklearn.datasets.load_digits`). Columns as for MNIST.

The recipes import this file as a sibling module (`from data import ...`); other scripts can add the `recipes`
folder to `sys.path` and do the same.
"""

import gzip
import os
from dataclasses import dataclass

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, Value
from transformers.utils import logging


logger = logging.get_logger(__name__)

DIGIT_CLASS_NAMES = [str(digit) for digit in range(10)]


def ensure_class_label(dataset: Dataset, column: str, class_label: ClassLabel | None = None) -> Dataset:
    """
    Return `dataset` with `column` as a `ClassLabel` feature, so that class names travel with the label ids.

    A `ClassLabel` column is returned as it is. Integer labels keep their values and get the names "0", "1", ...;
    string labels are encoded as ids of their sorted names. With `class_label` given (the feature of the training
    split), another split is encoded with the same names and ids.

    Raises:
        ValueError: when the column is missing, contains negative ids (unlabelled rows, as in some test splits),
            or contains a label that `class_label` does not name.
    """
    if column not in dataset.column_names:
        raise ValueError(
            f"Label column {column!r} not found; the dataset has columns {dataset.column_names}. Name the class "
            "column with --label_column."
        )
    feature = dataset.features[column]
    if isinstance(feature, ClassLabel):
        if class_label is not None and feature.names != class_label.names:
            raise ValueError(
                f"The classes of column {column!r} ({feature.names}) differ from the training split's "
                f"({class_label.names})."
            )
        return dataset
    if not isinstance(feature, Value):
        raise ValueError(f"Label column {column!r} has feature {feature}; expected class ids or class names.")

    if feature.dtype in ("string", "large_string", "string_view"):
        if class_label is None:
            logger.info(f"Encoding the string labels of column {column!r} as class ids of their sorted names.")
            return dataset.class_encode_column(column)
        unknown = sorted(set(dataset.unique(column)) - set(class_label.names))
        if unknown:
            raise ValueError(
                f"Column {column!r} contains labels {unknown[:10]} that the training split does not have."
            )
        return dataset.cast_column(column, class_label)

    labels = np.asarray(dataset[column])
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Label column {column!r} contains {labels.dtype} values; expected class ids or class names.")
    if labels.size and labels.min() < 0:
        raise ValueError(
            f"Label column {column!r} contains negative ids (for example {int(labels.min())}), which mark unlabelled "
            "rows. Choose a labelled split."
        )
    if class_label is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
        class_label = ClassLabel(names=[str(index) for index in range(num_classes)])
    elif labels.size and labels.max() >= class_label.num_classes:
        raise ValueError(
            f"Label column {column!r} contains id {int(labels.max())}, but the training split has "
            f"{class_label.num_classes} classes."
        )
    return dataset.cast_column(column, class_label)


# Sentence files: `<label> <sentence>` per line.


@dataclass(frozen=True)
class SentenceFileFormat:
    """
    A folder layout of sentence files: the file of each split, the class names in label-id order, and the split
    that is held out for evaluation.
    """

    name: str
    files: dict[str, str]
    class_names: list[str]
    eval_split: str


SST2_FORMAT = SentenceFileFormat(
    name="sst2",
    files={"train": "stsa.binary.train", "dev": "stsa.binary.dev", "test": "stsa.binary.test"},
    class_names=["negative", "positive"],
    eval_split="dev",
)
TREC_FORMAT = SentenceFileFormat(
    name="trec",
    files={"train": "TREC.train.all", "test": "TREC.test.all"},
    class_names=["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"],
    eval_split="test",
)
SENTENCE_FORMATS = {layout.name: layout for layout in (SST2_FORMAT, TREC_FORMAT)}


def read_labelled_sentences(path: str, class_names: list[str]) -> Dataset:
    """
    Read a file of `<label> <sentence>` lines into a dataset with columns `text` and `label`.

    The label is the integer id of the class (an index into `class_names`) and the sentence is the rest of the line
    after the first space, kept as written. Blank lines are skipped. Lines are decoded as UTF-8 one by one.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: when a line has no sentence, or a label that is not an id of `class_names`; the message names
            the file and line number.

    Example:
        >>> trec = read_labelled_sentences("trec/TREC.train.all", TREC_FORMAT.class_names)
        >>> trec.features["label"].names[trec[0]["label"]], trec[0]["text"]
        ('DESC', 'How did serfdom develop in and then leave Russia ?')
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Sentence file not found: {path}.")
    with open(path, "rb") as stream:
        lines = stream.read().splitlines()

    texts, labels, replaced = [], [], []
    for number, raw_line in enumerate(lines, start=1):
        # An invalid UTF-8 byte (TREC.train.all has one, 0xF0 in "sister\xf0city") is decoded as U+FFFD with
        # errors="replace", so the row is kept, every valid character is unchanged, and a warning names the line.
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            line = raw_line.decode("utf-8", errors="replace")
            replaced.append(number)
        if not line.strip():
            continue

        label, _, sentence = line.partition(" ")
        if not sentence.strip():
            raise ValueError(f"{path}, line {number}: expected '<label> <sentence>', got {line!r}.")
        if not label.isdigit() or int(label) >= len(class_names):
            raise ValueError(
                f"{path}, line {number}: the label {label!r} is not a class id; expected an integer from 0 to "
                f"{len(class_names) - 1} ({', '.join(class_names)})."
            )
        texts.append(sentence)
        labels.append(int(label))

    if replaced:
        logger.warning(
            f"{path}: line(s) {replaced} are not valid UTF-8; each invalid byte was read as U+FFFD and the rows "
            "were kept."
        )
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(class_names))})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def detect_sentence_format(folder: str) -> SentenceFileFormat:
    """
    Return the layout of `folder`: the first of `SENTENCE_FORMATS` whose training file the folder contains.

    Raises:
        FileNotFoundError: when the folder does not exist or contains no known training file.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Data folder not found: {folder}.")
    for layout in SENTENCE_FORMATS.values():
        if os.path.isfile(os.path.join(folder, layout.files["train"])):
            return layout
    expected = ", ".join(f"{layout.files['train']} ({layout.name})" for layout in SENTENCE_FORMATS.values())
    raise FileNotFoundError(
        f"{folder} contains no known sentence file; expected one of: {expected}. Its files: "
        f"{sorted(os.listdir(folder))}."
    )


def load_sentence_folder(folder: str, split: str = "train") -> Dataset:
    """
    Read one split of a folder of sentence files, in the SST-2 or TREC layout (see `SENTENCE_FORMATS`).

    Raises:
        FileNotFoundError: when the folder has no known layout or lacks the split's file.
        ValueError: when `split` is not a split of the folder's layout.

    Example:
        >>> load_sentence_folder("sst2", "dev").features["label"].names
        ['negative', 'positive']
    """
    layout = detect_sentence_format(folder)
    if split not in layout.files:
        raise ValueError(
            f"Split {split!r} is not part of the {layout.name} layout of {folder}; choose one of {list(layout.files)}."
        )
    return read_labelled_sentences(os.path.join(folder, layout.files[split]), layout.class_names)


# MNIST: idx files.

# Type codes of the idx format (third byte of the magic number) and the numpy type of each, big-endian.
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str) -> np.ndarray:
    """
    Read an idx file (the format of the MNIST files), gzip-compressed or not, into a numpy array.

    The header is two zero bytes, a type code (see `IDX_DTYPES`), the number of dimensions d, then d big-endian
    uint32 sizes. The values follow in row-major order.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: when the header is invalid or the data is shorter or longer than the header declares.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"idx file not found: {path}.")
    with open(path, "rb") as stream:
        content = stream.read()
    if content[:2] == GZIP_MAGIC:
        content = gzip.decompress(content)

    if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] not in IDX_DTYPES:
        raise ValueError(
            f"{path} is not an idx file: its magic number is {content[:4].hex()}; expected 0000 followed by a type "
            f"code ({', '.join(f'{code:02x}' for code in IDX_DTYPES)}) and the number of dimensions."
        )
    dtype = IDX_DTYPES[content[2]]
    num_dims = content[3]
    header_size = 4 + 4 * num_dims
    if len(content) < header_size:
        raise ValueError(f"{path} ends inside its header ({len(content)} bytes, header of {header_size} bytes).")
    shape = tuple(int(size) for size in np.frombuffer(content, dtype=">u4", count=num_dims, offset=4))

    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(content) - header_size
    if actual != expected:
        raise ValueError(
            f"{path} declares shape {shape} of {dtype} ({expected} bytes of data) but contains {actual} bytes of data."
        )
    return np.frombuffer(content, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def mnist_splits(folder: str) -> list[str]:
    """Return the MNIST splits (`train`, `test`) whose image and label files are both in `folder`."""
    return [
        split
        for split, names in MNIST_FILES.items()
        if all(os.path.isfile(os.path.join(folder, name)) for name in names)
    ]


def load_mnist(folder: str, split: str | None = None) -> Dataset:
    """
    Read one MNIST split from its idx gzip files in `folder`.

    Args:
        folder: folder with `train-images-idx3-ubyte.gz` and `train-labels-idx1-ubyte.gz`, or the `t10k-` files
            of the test split, or both.
        split: `train` or `test`. Defaults to `train` when its files are present, else `test`.

    Returns:
        A dataset with an `image` column (28x28 grayscale `Image`) and a `label` column (`ClassLabel` of the
        digits "0" to "9").

    Raises:
        FileNotFoundError: when the folder lacks the files of the split.
        ValueError: when the image and label files disagree on the number of rows, or hold no 3-D images.

    Example:
        >>> mnist = load_mnist("mnist-test")
        >>> len(mnist), mnist[0]["image"].size
        (10000, (28, 28))
    """
    available = mnist_splits(folder) if os.path.isdir(folder) else []
    if split is None:
        split = "train" if "train" in available else "test"
    if split not in MNIST_FILES:
        raise ValueError(f"Unknown MNIST split {split!r}; choose one of {list(MNIST_FILES)}.")
    if split not in available:
        image_name, label_name = MNIST_FILES[split]
        raise FileNotFoundError(
            f"The MNIST {split} split needs {image_name} and {label_name} in {folder}; splits found there: "
            f"{available or 'none'}."
        )

    image_name, label_name = MNIST_FILES[split]
    images = read_idx(os.path.join(folder, image_name))
    labels = read_idx(os.path.join(folder, label_name))
    if images.ndim != 3:
        raise ValueError(f"{image_name} contains an array of shape {images.shape}; expected (rows, height, width).")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"{image_name} contains {images.shape[0]} images but {label_name} contains labels of shape {labels.shape}."
        )
    return _image_dataset(images.astype(np.uint8), labels.astype(np.int64))


# scikit-learn digits.


def load_digits_dataset() -> Dataset:
    """
    Load the 1797 handwritten 8x8 digits that ship inside scikit-learn (`sklearn.datasets.load_digits`).

    scikit-learn stores gray levels 0 to 16; they are scaled to 0 to 255 (times 255/16, rounded) so that the images
    display as usual, and `round(pixel * 16 / 255)` gives each original level back.

    Returns:
        A dataset with an `image` column (8x8 grayscale `Image`) and a `label` column (`ClassLabel` of the digits
        "0" to "9"), in scikit-learn's row order.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _image_dataset(images, digits.target.astype(np.int64))


def _image_dataset(images: np.ndarray, labels: np.ndarray) -> Dataset:
    """Build a dataset of grayscale `images` (rows, height, width) of uint8 and their digit `labels`."""
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_CLASS_NAMES)})
    return Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
