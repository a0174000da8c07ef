#!/usr/bin/env python
"""
How well do MoSo, EL2N and GraNd rank rows by their true leave-one-out value?

A small MLP is trained on scikit-learn's digits (1797 8x8 images; 1297 training rows, 500 held out, stratified, seed
0) by full-batch gradient descent in float64 with `MoSoTrainer`. Full batches make training deterministic and
independent of row order, so retraining without one row changes nothing but that row: same seed, same initial
weights, same learning rates. For 200 rows z drawn at random the model is retrained without z, and the true values

    LOO_train(z) = L(S\\z, w_{S\\z}) - L(S\\z, w_S)    (the quantity MoSo approximates)
    LOO_eval(z)  = L(E, w_{S\\z}) - L(E, w_S)          (mean loss on the 500 held-out rows E)

are compared with the scores by Spearman and Kendall rank correlation. Higher means "removing z hurts more" for
both the true values and every score. MoSo is evaluated with 1, 3, 5 and 10 snapshots (evenly spaced over training,
as `moso_num_snapshots` spreads them); EL2N and GraNd use the snapshots of the first half of training.

Writes `docs/fidelity.md` and `docs/fidelity_results.json`; the retrained losses are appended to a JSON-lines file
as they finish, so an interrupted run resumes.

Example:
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fidelity.py
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from datasets import Dataset
from scipy.stats import kendalltau, spearmanr
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from transformers import TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging

from common import REPOSITORY, append_result, describe_machine, read_results, today
from hf_moso import MoSoConfig, MoSoTrainer, compute_el2n_scores, compute_grand_scores, compute_moso_scores
from hf_moso.parameters import select_parameters
from hf_moso.snapshots import evenly_spaced_steps, read_manifest


logger = logging.get_logger("benchmarks.fidelity")

SNAPSHOT_COUNTS = [1, 3, 5, 10]


class DigitsMLP(nn.Module):
    """64 -> hidden -> 10 with tanh, float64; returns the mean cross-entropy like a transformers classifier."""

    def __init__(self, hidden: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(64, hidden, dtype=torch.float64)
        self.output = nn.Linear(hidden, 10, dtype=torch.float64)

    def forward(self, pixel_values, labels=None):
        logits = self.output(torch.tanh(self.hidden(pixel_values)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def digits_split():
    digits = load_digits()
    features = digits.data.astype(np.float64) / 16.0
    train_index, eval_index = train_test_split(
        np.arange(len(digits.target)), test_size=500, stratify=digits.target, random_state=0
    )

    def build(index):
        return Dataset.from_dict({"pixel_values": features[index], "label": digits.target[index]}).with_format(
            "torch", dtype=torch.float64
        )

    return build(train_index), build(eval_index)


def row_cross_entropy(model, batch):
    """Cross-entropy of every row of `batch` alone, shape `(B,)`: the row loss MoSo differentiates."""
    logits = model(batch["pixel_values"]).logits
    return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


def collate(rows):
    return {
        "pixel_values": torch.stack([torch.as_tensor(row["pixel_values"], dtype=torch.float64) for row in rows]),
        "labels": torch.tensor([int(row["label"]) for row in rows], dtype=torch.long),
    }


def arguments(settings, output_dir, num_rows, moso=False, snapshot_steps=None):
    values = dict(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=num_rows,
        per_device_eval_batch_size=num_rows,
        learning_rate=settings.learning_rate,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=settings.seed,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
        max_grad_norm=0.0,
    )
    if moso:
        return MoSoConfig(**values, moso_snapshot_steps=snapshot_steps, moso_batch_size=256)
    return TrainingArguments(**values)


def gradient_descent(settings, batch, exclude=None):
    """
    Train a fresh `DigitsMLP` as the Trainer does with these arguments, without row `exclude` when it is given.

    The updates are full-batch SGD with a constant learning rate, no momentum, no weight decay and no gradient
    clipping, from the initial weights of `settings.seed`. A plain loop costs a small fraction of a Trainer run,
    which matters for 200 retrainings.
    """
    model = DigitsMLP(settings.hidden, settings.seed)
    inputs, labels = batch["pixel_values"], batch["labels"]
    if exclude is not None:
        keep = torch.ones(labels.shape[0], dtype=torch.bool)
        keep[exclude] = False
        inputs, labels = inputs[keep], labels[keep]
    parameters = list(model.parameters())
    for _ in range(settings.steps):
        loss = nn.functional.cross_entropy(model(inputs).logits, labels)
        gradients = torch.autograd.grad(loss, parameters)
        with torch.no_grad():
            for parameter, gradient in zip(parameters, gradients):
                parameter -= settings.learning_rate * gradient
    return model


@torch.no_grad()
def per_row_losses(model, batch):
    model.eval()
    return nn.functional.cross_entropy(model(batch["pixel_values"]).logits, batch["labels"], reduction="none")


def mean_loss_without(losses, row):
    return float((losses.sum() - losses[row]) / (losses.shape[0] - 1))


def correlations(scores, truth):
    spearman = spearmanr(scores, truth)
    kendall = kendalltau(scores, truth)
    return {
        "spearman": float(spearman.statistic),
        "spearman_p": float(spearman.pvalue),
        "kendall": float(kendall.statistic),
        "kendall_p": float(kendall.pvalue),
    }


def main(settings):
    train, evaluation = digits_split()
    num_rows = len(train)
    work = settings.work_dir
    os.makedirs(work, exist_ok=True)

    # One run on all rows records the snapshots of every count in SNAPSHOT_COUNTS.
    steps_of_count = {count: evenly_spaced_steps(settings.steps, count) for count in SNAPSHOT_COUNTS}
    # Every `settings.steps // 20` steps as well, for the correlation of each snapshot's term on its own.
    all_steps = sorted(
        {step for steps in steps_of_count.values() for step in steps}
        | set(range(1, settings.steps + 1, max(1, settings.steps // 20)))
    )
    trainer = MoSoTrainer(
        model=DigitsMLP(settings.hidden, settings.seed),
        args=arguments(settings, os.path.join(work, "full"), num_rows, moso=True, snapshot_steps=all_steps),
        train_dataset=train,
        data_collator=collate,
        row_loss_function=row_cross_entropy,
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    full_model = trainer.model

    # MoSo term of each snapshot, then averages over the snapshot sets of each count.
    start = time.perf_counter()
    manifest = read_manifest(trainer.args.moso_snapshot_folder)
    parameters = select_parameters(full_model, None, manifest.parameter_groups)
    dataloader = trainer._scoring_dataloader(train)
    terms = {}
    for snapshot in manifest.snapshots:
        terms[snapshot.step] = compute_moso_scores(
            full_model,
            lambda: iter(dataloader),
            num_rows,
            trainer.args.moso_snapshot_folder,
            [snapshot],
            parameters,
            backend=trainer.scoring_backend,
            show_progress=False,
        )
    moso_seconds = time.perf_counter() - start
    scores = {f"MoSo, T={count}": np.mean([terms[s] for s in steps_of_count[count]], axis=0) for count in SNAPSHOT_COUNTS}
    late = [step for step in steps_of_count[10] if step > settings.steps // 2]
    scores[f"MoSo, T={len(late)} of the second half (steps {', '.join(map(str, late))})"] = np.mean(
        [terms[s] for s in late], axis=0
    )
    # EL2N and GraNd over the snapshots of the first half of training among the T=10 set.
    early = [step for step in steps_of_count[10] if step <= settings.steps // 2]
    scores["EL2N"] = compute_el2n_scores(trainer, snapshot_steps=early)
    scores["GraNd"] = compute_grand_scores(trainer, snapshot_steps=early)

    # Leave-one-out retraining, resumable.
    rows = np.sort(np.random.default_rng(settings.seed).choice(num_rows, size=settings.num_rows, replace=False))
    results_path = os.path.join(work, "loo.jsonl")
    done = {row["row"]: row for row in read_results(results_path) if row.get("steps") == settings.steps}
    train_batch = collate([train[index] for index in range(num_rows)])
    eval_batch = collate([evaluation[index] for index in range(len(evaluation))])
    full_train_losses = per_row_losses(full_model, train_batch)

    # The plain loop must reproduce the Trainer's run on all rows, or the retrained models are not comparable.
    replica = gradient_descent(settings, train_batch)
    replica_difference = max(
        float((a.detach() - b.detach()).abs().max()) for a, b in zip(replica.parameters(), full_model.parameters())
    )
    if replica_difference > 1e-8:
        raise RuntimeError(
            f"Plain gradient descent ends {replica_difference:.2e} away from the Trainer's weights; the leave-one-out "
            "retraining would not match the full run."
        )
    base_eval = float(per_row_losses(full_model, eval_batch).mean())
    start = time.perf_counter()
    for position, row in enumerate(rows):
        row = int(row)
        if row in done:
            continue
        row_start = time.perf_counter()
        retrained = gradient_descent(settings, train_batch, exclude=row)
        record = {
            "row": row,
            "steps": settings.steps,
            "train_loss_without": mean_loss_without(per_row_losses(retrained, train_batch), row),
            "eval_loss_without": float(per_row_losses(retrained, eval_batch).mean()),
            "seconds": time.perf_counter() - row_start,
        }
        append_result(results_path, record)
        done[row] = record
        if position % 20 == 0:
            logger.warning(f"leave-one-out {position + 1}/{len(rows)}")
    loo_seconds = sum(done[int(row)].get("seconds", float("nan")) for row in rows)

    truth_train = np.array(
        [done[int(r)]["train_loss_without"] - mean_loss_without(full_train_losses, int(r)) for r in rows]
    )
    truth_eval = np.array([done[int(r)]["eval_loss_without"] - base_eval for r in rows])
    per_snapshot = {
        step: {
            "train_spearman": float(spearmanr(term[rows], truth_train).statistic),
            "eval_spearman": float(spearmanr(term[rows], truth_eval).statistic),
            "mean_abs_term": float(np.abs(term).mean()),
        }
        for step, term in sorted(terms.items())
    }
    table = {
        name: {"train": correlations(values[rows], truth_train), "eval": correlations(values[rows], truth_eval)}
        for name, values in scores.items()
    }
    report = {
        "table": table,
        "rows": rows.tolist(),
        "per_snapshot": per_snapshot,
        "settings": vars(settings),
        "train_seconds": train_seconds,
        "moso_seconds_all_snapshots": moso_seconds,
        "loo_seconds": loo_seconds,
        "replica_max_abs_difference": replica_difference,
        "truth_train_mean_abs": float(np.abs(truth_train).mean()),
        "truth_eval_mean_abs": float(np.abs(truth_eval).mean()),
        "machine": describe_machine(),
        "date": today(),
    }
    with open(os.path.join(REPOSITORY, "docs", "fidelity_results.json"), "w", encoding="utf-8") as stream:
        json.dump(report, stream, indent=2)
    write_markdown(report, settings)


def write_markdown(report, settings):
    lines = [
        "# Leave-one-out fidelity of MoSo, EL2N and GraNd",
        "",
        "Rank correlation between each score and the true leave-one-out value of 200 randomly drawn training rows of",
        "scikit-learn's digits, computed by retraining without each row. Higher is better; 1 is a perfect ranking.",
        "",
        "| score | Spearman (train LOO) | Kendall (train LOO) | Spearman (held-out LOO) | Kendall (held-out LOO) |",
        "|---|---|---|---|---|",
    ]
    for name, entry in report["table"].items():
        train, held_out = entry["train"], entry["eval"]
        lines.append(
            f"| {name} | {train['spearman']:.3f} | {train['kendall']:.3f} | {held_out['spearman']:.3f} | "
            f"{held_out['kendall']:.3f} |"
        )
    lines += [
        "",
        "Each snapshot's term on its own (the MoSo score with that one snapshot), against the true values:",
        "",
        "| step | Spearman (train LOO) | Spearman (held-out LOO) | mean abs term |",
        "|---|---|---|---|",
    ]
    for step, entry in report["per_snapshot"].items():
        lines.append(
            f"| {step} | {entry['train_spearman']:.3f} | {entry['eval_spearman']:.3f} | {entry['mean_abs_term']:.2e} |"
        )
    negative = [step for step, entry in report["per_snapshot"].items() if entry["train_spearman"] < 0]
    total = sum(entry["mean_abs_term"] for entry in report["per_snapshot"].values())
    share = sum(report["per_snapshot"][step]["mean_abs_term"] for step in negative) / total if total else 0.0
    lines += [
        "",
        f"The terms of steps {negative} rank rows against their true value and carry {100 * share:.0f} % of the summed",
        "mean |term| of the snapshots above, so an evenly spaced average over the whole run is dominated by them.",
    ]
    late_name = next(name for name in report["table"] if "second half" in name)
    lines.append(
        f"Averaging only over the second half of training gives Spearman "
        f"{report['table'][late_name]['train']['spearman']:.3f} (train LOO), against "
        f"{report['table']['EL2N']['train']['spearman']:.3f} for EL2N and "
        f"{report['table']['MoSo, T=10']['train']['spearman']:.3f} for MoSo with T=10 evenly spaced snapshots."
    )
    lines += [
        "",
        "- Train LOO: L(S\\z, w_{S\\z}) - L(S\\z, w_S), the change in mean training loss on the other rows, which MoSo",
        "  approximates. Held-out LOO: the change in mean loss on 500 held-out rows.",
        f"- Setup: MLP 64-{settings.hidden}-10 (tanh, float64), {len(report['rows'])} leave-one-out rows out of 1297 "
        f"training rows, full-batch SGD, {settings.steps} steps, constant learning rate {settings.learning_rate}, "
        f"seed {settings.seed}. Full batches make each retraining differ from the full run only by the removed row.",
        "  The full run uses `MoSoTrainer`; the retrainings use a plain loop of the same updates, which reproduces the",
        f"  Trainer's final weights to {report['replica_max_abs_difference']:.1e} (max abs difference).",
        "- MoSo with T snapshots uses the T steps `moso_num_snapshots=T` would choose (evenly spaced from step 1);",
        "  EL2N and GraNd average over the snapshots of the first half of training.",
        f"- Mean |true value|: train LOO {report['truth_train_mean_abs']:.2e}, held-out LOO "
        f"{report['truth_eval_mean_abs']:.2e}. Full values (with p-values): `docs/fidelity_results.json`.",
        f"- Time: training {report['train_seconds']:.1f} s, MoSo terms of all snapshots "
        f"{report['moso_seconds_all_snapshots']:.1f} s, leave-one-out retraining {report['loo_seconds']:.0f} s "
        f"for all {len(report['rows'])} rows.",
        "",
        f"Command: `OMP_NUM_THREADS=1 nice -n 19 python benchmarks/fidelity.py --steps {settings.steps} --num_rows {settings.num_rows}`",
        "",
        f"Machine: {report['machine']}. Shared with other jobs while it ran. Date: {report['date']}.",
        "",
    ]
    with open(os.path.join(REPOSITORY, "docs", "fidelity.md"), "w", encoding="utf-8") as stream:
        stream.write("\n".join(lines))


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="Full-batch gradient steps per training run.")
    parser.add_argument("--learning_rate", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=32, help="Hidden units of the MLP.")
    parser.add_argument("--num_rows", type=int, default=200, help="Rows retrained without.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=os.path.join(REPOSITORY, "outputs", "fidelity"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_arguments())
