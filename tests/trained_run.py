"""A tiny trained MoSoTrainer run on disk, as a user has it before calling `hf-moso`: model, tokenizer, snapshots."""

import os
import random
import subprocess
import sys

import torch
from datasets import ClassLabel, Dataset, Features, Value
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, DataCollatorWithPadding

from hf_moso import MoSoConfig, MoSoTrainer


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "good", "bad", "great", "awful", "movie", "film", "plot", "actor", "boring", "fun",
    "the", "a", "was", "is", "very", "not", "really", "story", "music", "ending",
]  # fmt: skip
NUM_LABELS = 3


def write_tokenizer(folder: str) -> BertTokenizerFast:
    os.makedirs(folder, exist_ok=True)
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as stream:
        stream.write("\n".join(SPECIAL_TOKENS + WORDS) + "\n")
    # transformers 5 reads the vocabulary from `vocab=` (a path or a dict); it ignores a `vocab_file=` keyword.
    tokenizer = BertTokenizerFast(vocab=vocab_file, do_lower_case=True)
    if tokenizer.unk_token_id in tokenizer(" ".join(WORDS))["input_ids"]:
        raise RuntimeError(f"The tokenizer built from {vocab_file} does not know the test words.")
    return tokenizer


def text_dataset(num_rows: int, seed: int = 0) -> Dataset:
    """Sentences of 3 to 8 words with a class label that depends on the words."""
    generator = random.Random(seed)
    texts, labels = [], []
    for index in range(num_rows):
        words = [generator.choice(WORDS) for _ in range(generator.randint(3, 8))]
        texts.append(" ".join(words))
        labels.append((index + sum(len(word) for word in words)) % NUM_LABELS)
    features = Features({"text": Value("string"), "label": ClassLabel(num_classes=NUM_LABELS)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def train_run(
    folder: str, num_rows: int = 24, num_snapshots: int = 3, moso_parameters: list[str] | None = None
) -> dict:
    """
    Train a tiny BERT classifier with MoSoTrainer and save it like a user does; `moso_parameters` go to its config.

    Returns the paths: `model_dir` (the output folder, with the snapshots in `model_dir/moso`) and `dataset_dir`
    (the training rows, text and label, saved with `save_to_disk`).
    """
    model_dir = os.path.join(folder, "run")
    dataset_dir = os.path.join(folder, "data")
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    dataset = text_dataset(num_rows)
    dataset.save_to_disk(dataset_dir)

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=NUM_LABELS,
    )
    model = BertForSequenceClassification(config)
    tokenized = dataset.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    args = MoSoConfig(
        output_dir=model_dir,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=5e-2,
        moso_num_snapshots=num_snapshots,
        moso_parameters=moso_parameters,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = MoSoTrainer(
        model=model,
        args=args,
        train_dataset=tokenized,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    return {"model_dir": model_dir, "dataset_dir": dataset_dir}


def hf_moso_command() -> list[str]:
    """The installed `hf-moso` script of this Python environment."""
    script = os.path.join(os.path.dirname(sys.executable), "hf-moso")
    if not os.path.isfile(script):
        raise RuntimeError(f"{script} not found; install the package with `pip install -e .` to create it.")
    return [script]


def run_cli(*arguments: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `hf-moso` with `arguments` in a subprocess, as from a shell, in `env` (default: this process's)."""
    return subprocess.run(
        hf_moso_command() + list(arguments),
        capture_output=True,
        text=True,
        env=dict(os.environ) if env is None else env,
        timeout=timeout,
    )
