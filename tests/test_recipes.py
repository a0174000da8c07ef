"""The recipes as a user runs them, and their data readers on real and hand-made files."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Value, load_from_disk
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from conftest import SHARED_DATA


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPOSITORY, "recipes")
sys.path.insert(0, RECIPES)

import data  # noqa: E402
from moso_run import parse_keep  # noqa: E402
from text_classification import last_layer_parameters  # noqa: E402


TREC_DIR = os.path.join(SHARED_DATA, "trec")
SST2_DIR = os.path.join(SHARED_DATA, "sst2")
MNIST_DIR = os.path.join(SHARED_DATA, "mnist-test")
TREC_NAMES = ["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"]

# Settings that keep a recipe run to a few seconds of training and scoring.
QUICK = ["--num_train_epochs", "1", "--moso_num_snapshots", "2", "--disable_tqdm", "true", "--seed", "0"]


def needs(folder):
    return pytest.mark.skipif(
        not os.path.isdir(folder), reason=f"real data folder {os.path.abspath(folder)} is absent"
    )


def recipe_environment():
    # One OpenMP thread per recipe, because the per-row backward passes are small. On a 2-core CPU shared with
    # other jobs, two threads made the scoring of the 120-row digits run 20 times slower (37 s against 1.7 s).
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_recipe(name, *arguments):
    completed = subprocess.run(
        [sys.executable, os.path.join(RECIPES, name), *arguments],
        cwd=REPOSITORY,
        env=recipe_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, f"{name} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
    return completed.stdout


def read_summary(output_dir):
    with open(os.path.join(output_dir, "moso_summary.json"), encoding="utf-8") as stream:
        return json.load(stream)


# Recipes, end to end.


def test_digits_recipe_class_balanced(tmp_path):
    output_dir = str(tmp_path / "digits")
    stdout = run_recipe(
        "image_classification.py", "--output_dir", output_dir, "--max_train_rows", "120", "--keep", "0.5", *QUICK
    )

    pruned = load_from_disk(os.path.join(output_dir, "pruned_dataset"))
    assert len(pruned) == 60
    assert pruned.column_names == ["image", "label", "moso_score"]
    assert pruned.features["moso_score"] == Value("float64")
    assert pruned.features["label"].names == [str(digit) for digit in range(10)]
    assert np.isfinite(pruned["moso_score"]).all()
    assert pruned[0]["image"].size == (8, 8)

    summary = read_summary(output_dir)
    assert summary["rows_before"] == 120
    assert summary["rows_after"] == 60
    assert sum(summary["class_counts_before"].values()) == 120
    assert summary["class_counts_after"] == {
        name: int(count)
        for name, count in zip(pruned.features["label"].names, np.bincount(pruned["label"], minlength=10))
    }
    # Class-balanced quotas follow class sizes, so each class keeps half of its rows, within one row.
    for name, before in summary["class_counts_before"].items():
        assert abs(summary["class_counts_after"][name] - before / 2) <= 1
    assert summary["score_min"] <= min(pruned["moso_score"])
    assert summary["score_max"] == max(pruned["moso_score"])
    assert "120 rows before, 60 rows after" in stdout
    assert "time: train" in stdout


@needs(MNIST_DIR)
def test_mnist_recipe_global_count(tmp_path):
    output_dir = str(tmp_path / "mnist")
    run_recipe(
        "image_classification.py",
        "--output_dir", output_dir,
        "--mnist_dir", MNIST_DIR,
        "--validation_fraction", "0",
        "--max_train_rows", "80",
        "--keep", "25",
        "--no_class_balanced",
        *QUICK,
    )

    pruned = load_from_disk(os.path.join(output_dir, "pruned_dataset"))
    assert len(pruned) == 25
    assert pruned[0]["image"].size == (28, 28)
    assert pruned.features["moso_score"] == Value("float64")
    summary = read_summary(output_dir)
    assert summary["class_balanced"] is False
    assert summary["eval_accuracy"] is None
    # Global pruning keeps the 25 highest scores of the 80.
    assert summary["score_max"] == max(pruned["moso_score"])


def test_recipe_rejects_keep_beyond_rows(tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(RECIPES, "image_classification.py"), "--output_dir", str(tmp_path / "out"),
         "--max_train_rows", "50", "--keep", "500"],
        cwd=REPOSITORY,
        env=recipe_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode != 0
    assert "Invalid --keep for a training set of 50 rows" in completed.stderr
    assert not os.path.isdir(tmp_path / "out" / "moso")


def tiny_bert_folder(folder, texts):
    """A randomly initialised 2-layer BERT and a word-level vocabulary of `texts`, saved like a Hub model."""
    words = sorted({word for text in texts for word in text.lower().split()})
    os.makedirs(folder, exist_ok=True)
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as stream:
        stream.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab_file)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs(TREC_DIR)
def test_text_recipe_on_trec_slice(tmp_path):
    train = data.load_sentence_folder(TREC_DIR, "train")
    model_dir = tiny_bert_folder(str(tmp_path / "tiny_bert"), train["text"])
    output_dir = str(tmp_path / "trec")
    stdout = run_recipe(
        "text_classification.py",
        "--data_dir", TREC_DIR,
        "--model_name_or_path", model_dir,
        "--output_dir", output_dir,
        "--max_train_rows", "90",
        "--max_eval_rows", "30",
        "--max_seq_length", "32",
        "--keep", "0.6",
        "--learning_rate", "1e-3",
        *QUICK,
    )

    pruned = load_from_disk(os.path.join(output_dir, "pruned_dataset"))
    assert len(pruned) == 54
    assert pruned.column_names == ["text", "label", "moso_score"]
    assert pruned.features["label"] == ClassLabel(names=TREC_NAMES)
    assert pruned.features["moso_score"] == Value("float64")

    summary = read_summary(output_dir)
    assert list(summary["class_counts_before"]) == TREC_NAMES
    assert sum(summary["class_counts_before"].values()) == 90
    assert sum(summary["class_counts_after"].values()) == 54
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    for name in TREC_NAMES:
        assert f"\n{name} " in stdout


def test_image_recipe_on_local_imagefolder(tmp_path):
    from PIL import Image

    generator = np.random.default_rng(0)
    for index in range(24):
        folder = tmp_path / "images" / "train" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = generator.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels, mode="RGB").save(folder / f"{index}.png")
    output_dir = str(tmp_path / "out")
    run_recipe(
        "image_classification.py",
        "--dataset_name", str(tmp_path / "images"),
        "--output_dir", output_dir,
        "--validation_fraction", "0.25",
        "--keep", "9",
        *QUICK,
    )

    pruned = load_from_disk(os.path.join(output_dir, "pruned_dataset"))
    assert len(pruned) == 9
    assert pruned.features["label"].names == ["cat", "dog"]
    assert pruned.features["moso_score"] == Value("float64")
    assert pruned[0]["image"].mode == "RGB"
    summary = read_summary(output_dir)
    assert summary["rows_before"] == 18
    assert summary["class_counts_before"] == {"cat": 9, "dog": 9}
    # Equal remainders of the two quotas of 4.5 rows go to the earlier class.
    assert summary["class_counts_after"] == {"cat": 5, "dog": 4}


def test_text_recipe_on_local_csv(tmp_path):
    sentences = ["a fine film", "a dull film", "fine acting", "dull acting", "truly fine", "truly dull"] * 4
    labels = ["pos" if "fine" in sentence else "neg" for sentence in sentences]
    folder = tmp_path / "reviews"
    folder.mkdir()
    Dataset.from_dict({"sentence": sentences, "label": labels}).to_csv(str(folder / "train.csv"))
    Dataset.from_dict({"sentence": sentences[:6], "label": labels[:6]}).to_csv(str(folder / "validation.csv"))
    model_dir = tiny_bert_folder(str(tmp_path / "tiny_bert"), sentences)
    output_dir = str(tmp_path / "out")
    run_recipe(
        "text_classification.py",
        "--dataset_name", str(folder),
        "--model_name_or_path", model_dir,
        "--output_dir", output_dir,
        "--keep", "0.5",
        *QUICK,
    )

    pruned = load_from_disk(os.path.join(output_dir, "pruned_dataset"))
    assert pruned.column_names == ["sentence", "label", "moso_score"]
    assert pruned.features["label"].names == ["neg", "pos"]
    summary = read_summary(output_dir)
    assert summary["class_counts_before"] == {"neg": 12, "pos": 12}
    assert summary["class_counts_after"] == {"neg": 6, "pos": 6}
    assert summary["eval_accuracy"] is not None


# Data readers on the real files.


@needs(SST2_DIR)
def test_sst2_reader_splits():
    sizes = {split: len(data.load_sentence_folder(SST2_DIR, split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 6920, "dev": 872, "test": 1821}
    dev = data.load_sentence_folder(SST2_DIR, "dev")
    assert dev.features["label"].names == ["negative", "positive"]
    assert dev[0] == {"text": "one long string of cliches .", "label": 0}
    train = data.load_sentence_folder(SST2_DIR, "train")
    assert np.bincount(train["label"]).tolist() == [3310, 3610]
    assert "béart and berling are both superb , while huppert ... is magnificent ." in train["text"]


@needs(TREC_DIR)
def test_trec_reader_keeps_invalid_byte_row():
    train = data.load_sentence_folder(TREC_DIR, "train")
    assert len(train) == 5452
    assert train.features["label"].names == TREC_NAMES
    assert np.bincount(train["label"]).tolist() == [1162, 1250, 86, 1223, 835, 896]
    assert train[65]["text"] == "Which city has the oldest relationship as a sister\ufffdcity with Los Angeles ?"
    assert train[65]["label"] == TREC_NAMES.index("LOC")
    assert sum("\ufffd" in text for text in train["text"]) == 1

    test = data.load_sentence_folder(TREC_DIR, "test")
    assert np.bincount(test["label"]).tolist() == [138, 94, 9, 65, 81, 113]


@needs(MNIST_DIR)
def test_mnist_reader_test_split():
    images = data.read_idx(os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8

    mnist = data.load_mnist(MNIST_DIR)
    assert len(mnist) == 10000
    assert mnist.features["label"].names == [str(digit) for digit in range(10)]
    assert np.bincount(mnist["label"]).sum() == 10000
    np.testing.assert_array_equal(np.asarray(mnist[0]["image"]), images[0])
    with pytest.raises(FileNotFoundError, match="train split needs train-images-idx3-ubyte.gz"):
        data.load_mnist(MNIST_DIR, "train")


def test_digits_reader_recovers_levels():
    from sklearn.datasets import load_digits

    digits = data.load_digits_dataset()
    reference = load_digits()
    assert len(digits) == 1797
    assert digits["label"] == reference.target.tolist()
    pixels = np.stack([np.asarray(image, dtype=np.float64) for image in digits[:20]["image"]])
    np.testing.assert_array_equal(np.rint(pixels * 16 / 255), reference.images[:20])


# Data readers on hand-made files.


def write_idx(path, array, type_code, compress):
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    content = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with open(path, "wb") as stream:
        stream.write(gzip.compress(content) if compress else content)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trip(tmp_path, compress):
    values = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    path = str(tmp_path / "values.idx")
    write_idx(path, values, 0x0C, compress)

    read = data.read_idx(path)
    np.testing.assert_array_equal(read, values)
    assert read.dtype == np.int32


def test_idx_reader_rejects_bad_files(tmp_path):
    path = str(tmp_path / "short.idx")
    write_idx(path, np.zeros((3, 2), dtype=np.uint8), 0x08, compress=False)
    with open(path, "ab") as stream:
        stream.write(b"\x00")
    with pytest.raises(ValueError, match="declares shape \\(3, 2\\)"):
        data.read_idx(path)

    with open(path, "wb") as stream:
        stream.write(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(path)


def test_sentence_reader_errors_name_line(tmp_path):
    path = tmp_path / "TREC.train.all"
    path.write_bytes(b"0 How far is it ?\n\n7 What is it ?\n")
    with pytest.raises(ValueError, match="line 3: the label '7' is not a class id"):
        data.read_labelled_sentences(str(path), TREC_NAMES)

    path.write_bytes(b"0 How far is it ?\n1\n")
    with pytest.raises(ValueError, match="line 2: expected '<label> <sentence>'"):
        data.read_labelled_sentences(str(path), TREC_NAMES)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train.csv").write_text("label,text\n")
    with pytest.raises(FileNotFoundError, match="contains no known sentence file"):
        data.load_sentence_folder(str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="Data folder not found"):
        data.load_sentence_folder(str(tmp_path / "missing"))


def test_ensure_class_label_encodes_splits():
    train = Dataset.from_dict({"label": ["spam", "ham", "spam"]})
    test = Dataset.from_dict({"label": ["ham", "spam"]})
    train = data.ensure_class_label(train, "label")
    assert train.features["label"].names == ["ham", "spam"]
    assert train["label"] == [1, 0, 1]
    test = data.ensure_class_label(test, "label", train.features["label"])
    assert test["label"] == [0, 1]

    with pytest.raises(ValueError, match="contains labels \\['eggs'\\] that the training split does not have"):
        data.ensure_class_label(Dataset.from_dict({"label": ["eggs"]}), "label", train.features["label"])
    with pytest.raises(ValueError, match="negative ids"):
        data.ensure_class_label(Dataset.from_dict({"label": [0, -1]}), "label")

    ids = data.ensure_class_label(Dataset.from_dict({"label": [2, 0]}), "label")
    assert ids.features["label"].names == ["0", "1", "2"]
    assert ids["label"] == [2, 0]


# Recipe helpers.


def test_parse_keep_fraction_or_count():
    assert parse_keep("0.7") == 0.7
    assert parse_keep("500") == 500 and isinstance(parse_keep("500"), int)
    assert parse_keep("1.0") == 1.0 and isinstance(parse_keep("1.0"), float)
    with pytest.raises(ValueError, match="neither a fraction"):
        parse_keep("most")


def test_last_layer_parameters_of_bert():
    model = BertForSequenceClassification(
        BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=8)
    )
    names = last_layer_parameters(model, 1)
    earlier = ("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.")
    assert not [name for name in names if name.startswith(earlier)]
    assert "bert.encoder.layer.2.output.dense.weight" in names
    assert "bert.pooler.dense.weight" in names
    assert "classifier.weight" in names

    head = last_layer_parameters(model, 0)
    assert head == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    assert last_layer_parameters(model, -1) is None
    assert len(last_layer_parameters(model, 3)) == len(names) + 2 * (len(names) - 4)
