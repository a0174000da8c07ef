"""Turn the JSON lines of `pruning.py` into `docs/pruning.md` and `docs/pruning_accuracy.png`."""

import os
from collections import defaultdict

import numpy as np

from common import REPOSITORY, read_results, today


METHOD_LABELS = {
    "moso_balanced": "MoSo (class-balanced)",
    "moso_global": "MoSo (global)",
    "random": "random",
    "el2n": "EL2N",
    "grand": "GraNd",
    "forgetting": "forgetting events",
    "moso_late_balanced": "MoSo, second half of training (class-balanced)",
    "moso_late_global": "MoSo, second half of training (global)",
}
DATASET_LABELS = {
    "mnist": "MNIST (8000 train / 2000 eval, small CNN)",
    "trec": "TREC (5452 train / 500 test, MiniLM fine-tuned)",
    "trec-frozen": "TREC (5452 train / 500 test, head on frozen MiniLM embeddings)",
}
EXPECTED_KEEP = [0.9, 0.7, 0.5, 0.3]
DEFAULT_METHODS = ["moso_balanced", "moso_global", "random", "el2n", "grand", "forgetting"]


def summarize(rows):
    """Group the results as accuracy[dataset][method][keep] = {seed: accuracy}. A repeated run keeps its last line."""
    accuracy = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    full = defaultdict(list)
    all_rows = defaultdict(list)
    for row in rows:
        if row["method"] == "full":
            full[row["dataset"]].append(row)
        elif row["method"] == "all_rows":
            all_rows[row["dataset"]].append(row)
        elif row.get("training") == "plain_loop":
            accuracy[row["dataset"]][row["method"]][row["keep"]][row["seed"]] = row["accuracy"]
    return accuracy, full, all_rows


def method_averages(per_keep, keeps):
    """Per seed, the mean accuracy over `keeps`; only seeds that have every keep fraction count."""
    seeds = set.intersection(*(set(per_keep.get(keep, {})) for keep in keeps)) if keeps else set()
    return np.array([np.mean([per_keep[keep][seed] for keep in keeps]) for seed in sorted(seeds)])


def verdict(per_method, keeps):
    lines = []
    average = {method: method_averages(per_keep, keeps) for method, per_keep in per_method.items()}
    average = {method: values for method, values in average.items() if len(values)}
    if not average:
        return ["No method has results at every keep fraction yet."]
    best_method = max(average, key=lambda method: average[method].mean())
    best = average[best_method]
    best_error = best.std(ddof=1) / np.sqrt(len(best)) if len(best) > 1 else 0.0
    lines.append(
        f"- Best average over keep fractions {keeps}: {METHOD_LABELS[best_method]} "
        f"({100 * best.mean():.2f} %, standard error {100 * best_error:.2f})."
    )
    for moso in ("moso_balanced", "moso_global", "moso_late_balanced", "moso_late_global"):
        if moso not in per_method:
            continue
        low = [keep for keep in keeps if keep <= 0.5]
        comparisons = []
        for keep in low:
            moso_seeds = per_method[moso].get(keep, {})
            random_seeds = per_method.get("random", {}).get(keep, {})
            if not moso_seeds or not random_seeds:
                comparisons.append(f"keep {keep}: missing")
                continue
            moso_mean = np.mean(list(moso_seeds.values()))
            random_mean = np.mean(list(random_seeds.values()))
            relation = ">=" if moso_mean >= random_mean else "<"
            comparisons.append(f"keep {keep}: {100 * moso_mean:.2f} {relation} {100 * random_mean:.2f} (random)")
        at_or_above = all(">=" in text for text in comparisons) and comparisons
        lines.append(
            f"- {METHOD_LABELS[moso]} at or above random at every keep fraction <= 0.5: "
            f"{'yes' if at_or_above else 'NO'} ({'; '.join(comparisons)})."
        )
        if moso in average:
            gap = best.mean() - average[moso].mean()
            tied = gap <= best_error or moso == best_method
            lines.append(
                f"- {METHOD_LABELS[moso]} best or tied-best on average (within one standard error of the best): "
                f"{'yes' if tied else 'NO'} (average {100 * average[moso].mean():.2f} %, "
                f"{100 * gap:.2f} points below the best)."
            )
    return lines


def write_plot(accuracy, all_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [name for name in DATASET_LABELS if name in accuracy]
    figure, axes = plt.subplots(1, max(len(datasets), 1), figsize=(6 * max(len(datasets), 1), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for method, label in METHOD_LABELS.items():
            per_keep = accuracy[dataset].get(method)
            if not per_keep:
                continue
            keeps = sorted(per_keep)
            means = [100 * np.mean(list(per_keep[keep].values())) for keep in keeps]
            stds = [100 * np.std(list(per_keep[keep].values()), ddof=1) if len(per_keep[keep]) > 1 else 0 for keep in keeps]
            axis.errorbar(keeps, means, yerr=stds, marker="o", capsize=3, label=label)
        if all_rows.get(dataset):
            reference = 100 * np.mean([row["accuracy"] for row in all_rows[dataset]])
            axis.axhline(reference, color="gray", linestyle="--", label="all rows")
        axis.set_title(DATASET_LABELS[dataset])
        axis.set_xlabel("keep fraction")
        axis.set_ylabel("accuracy (%)")
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def class_composition(dataset, score_seeds, work_dir, keep=0.3):
    """Table lines: rows kept per class at `keep` by each score of the first scoring run, against the full set."""
    from pruning import train_labels

    from hf_moso import select_rows

    path = os.path.join(work_dir, f"{dataset}-seed{score_seeds[0]}-scores.npz") if score_seeds else ""
    if not os.path.isfile(path):
        return []
    labels, names = train_labels(dataset)
    with np.load(path) as stored:
        scores = {name: stored[name] for name in stored.files}
    lines = [
        "",
        f"Rows kept per class at keep {keep} (scores of the scoring run with seed {score_seeds[0]}):",
        "",
        "| selection | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| all rows | " + " | ".join(str(count) for count in np.bincount(labels, minlength=len(names))) + " |",
    ]
    for method, label in METHOD_LABELS.items():
        score_name = {"moso_balanced": "moso", "moso_global": "moso"}.get(method, method)
        score = scores.get(score_name.replace("_balanced", "").replace("_global", ""))
        if score is None or len(score) != len(labels):
            continue
        kept = select_rows(score, keep, labels=labels, class_balanced=method.endswith("_balanced"))
        counts = np.bincount(labels[kept], minlength=len(names))
        lines.append(f"| {label} | " + " | ".join(str(count) for count in counts) + " |")
    return lines


def score_agreement(dataset, score_seeds, work_dir):
    """
    Return table lines with the Spearman rank correlation of each score between every pair of scoring runs. It
    shows how much of a ranking survives a new training run. No lines when fewer than two scoring runs are on disk.
    """
    from scipy.stats import spearmanr

    stored = {}
    for seed in score_seeds:
        path = os.path.join(work_dir, f"{dataset}-seed{seed}-scores.npz")
        if os.path.isfile(path):
            with np.load(path) as scores:
                stored[seed] = {name: scores[name] for name in scores.files}
    if len(stored) < 2:
        return []

    pairs = [(first, second) for index, first in enumerate(stored) for second in list(stored)[index + 1 :]]
    lines = [
        "",
        "Agreement of the scores between scoring runs (Spearman rank correlation over all training rows):",
        "",
        "| score | " + " | ".join(f"seeds {first} and {second}" for first, second in pairs) + " |",
        "|---|" + "---|" * len(pairs),
    ]
    for name, label in [("moso", "MoSo"), ("el2n", "EL2N"), ("grand", "GraNd"), ("forgetting", "forgetting events")]:
        if all(name in stored[seed] for seed in stored):
            values = [spearmanr(stored[first][name], stored[second][name])[0] for first, second in pairs]
            lines.append(f"| {label} | " + " | ".join(f"{value:.3f}" for value in values) + " |")
    return lines


def machines_of(rows) -> dict[str, set[str]]:
    """Group the datasets by the machine they ran on, from the `machine` field of the result lines."""
    machines = defaultdict(set)
    for row in rows:
        machines[row.get("machine", "not recorded")].add(row["dataset"])
    return machines


def write_report(results_path, markdown_name="pruning.md", plot_name="pruning_accuracy.png", work_dir=None):
    rows = read_results(results_path)
    accuracy, full, all_rows = summarize(rows)
    lines = [
        "# Pruned-training accuracy: MoSo against random, EL2N, GraNd and forgetting events",
        "",
        "Each cell: evaluation accuracy (%) of a model trained from scratch on the kept rows only, mean ± standard",
        "deviation over seeds (n = number of seeds). The scores come from a training run on all rows (the scoring",
        f"run) with the same hyperparameters. Plot: `docs/{plot_name}`. Raw results, one JSON line per training run:",
        f"`docs/{os.path.basename(results_path)}`.",
        "",
    ]
    summary = []
    summary_position = len(lines)
    for dataset in [name for name in DATASET_LABELS if name in accuracy or name in full]:
        per_method = accuracy.get(dataset, {})
        keeps = sorted({keep for per_keep in per_method.values() for keep in per_keep}, reverse=True)
        seeds = sorted({seed for per_keep in per_method.values() for runs in per_keep.values() for seed in runs})
        score_seeds = sorted({row["seed"] for row in full.get(dataset, [])})
        # The scoring runs whose scores chose the kept rows; other scoring runs only enter the agreement table.
        pruning_score_seeds = sorted(
            {
                row.get("score_seed", row["seed"])
                for row in rows
                if row["dataset"] == dataset and row.get("training") == "plain_loop" and row["method"] != "all_rows"
            }
        )
        agreement_only = [seed for seed in score_seeds if seed not in pruning_score_seeds]
        # The methods that have results: the scoring run's own `--methods` may differ when several processes share
        # one results file.
        methods = [method for method in METHOD_LABELS if method in per_method]
        expected = len(EXPECTED_KEEP) * len(methods) * max(len(seeds), 3)
        done = sum(len(per_keep[keep]) for per_keep in per_method.values() for keep in per_keep)
        lines += [f"## {DATASET_LABELS[dataset]}", ""]
        if done < expected or keeps != EXPECTED_KEEP:
            lines += [
                f"**Incomplete: {done} of {expected} pruned training runs finished** (keep fractions {keeps}, seeds "
                f"{seeds}). Cells with fewer seeds than the others are marked by their n.",
                "",
            ]
        for label, reference in [
            ("All rows (keep 1.0), same training loop", all_rows.get(dataset)),
            ("All rows, the scoring run with `MoSoTrainer`", full.get(dataset)),
        ]:
            if reference:
                values = np.array([row["accuracy"] for row in reference])
                spread = 100 * values.std(ddof=1) if len(values) > 1 else 0.0
                lines.append(f"- {label}: {100 * values.mean():.2f} ± {spread:.2f} % (n={len(values)}).")
        lines.append("")
        lines.append("| method | " + " | ".join(f"keep {keep}" for keep in keeps) + " | average |")
        lines.append("|---|" + "---|" * (len(keeps) + 1))
        for method, label in METHOD_LABELS.items():
            if method not in per_method:
                continue
            cells = []
            for keep in keeps:
                values = np.array(list(per_method[method].get(keep, {}).values()))
                if len(values) == 0:
                    cells.append("-")
                else:
                    spread = 100 * values.std(ddof=1) if len(values) > 1 else 0.0
                    cells.append(f"{100 * values.mean():.2f} ± {spread:.2f} (n={len(values)})")
            averages = method_averages(per_method[method], keeps)
            average = f"{100 * averages.mean():.2f}" if len(averages) else "-"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {average} |")
        lines += ["", "Against the claim (MoSo at or above random at keep <= 0.5, best or tied-best on average):", ""]
        claim_lines = verdict(per_method, keeps)
        lines += claim_lines
        meeting = [
            label
            for method, label in METHOD_LABELS.items()
            if method.startswith("moso")
            and len(checks := [line for line in claim_lines if line.startswith(f"- {label} ")]) == 2
            and all(": yes" in line for line in checks)
        ]
        summary.append(
            f"- {DATASET_LABELS[dataset]}: "
            + (
                f"{', '.join(meeting)} meet(s) both parts of the claim."
                if meeting
                else "no MoSo selection meets the claim in these measurements (see the checks below the table)."
            )
        )
        if work_dir is not None:
            lines += class_composition(dataset, pruning_score_seeds, work_dir)
            lines += score_agreement(dataset, score_seeds, work_dir)

        if full.get(dataset):
            settings = full[dataset][0]["settings"]
            timing = defaultdict(list)
            for row in full[dataset]:
                for method, seconds in row["score_seconds"].items():
                    timing[method].append(seconds)
            train_seconds = np.mean([row["train_seconds"] for row in full[dataset]])
            lines += [
                "",
                "Scoring time per scoring run (mean over runs; wall clock on a machine shared with other jobs, so only a",
                "rough guide)."
                + (
                    " Torch threads / 1-minute load average at the end of each scoring run: "
                    + ", ".join(f"{row['torch_threads']} / {row['load_average']:.1f}" for row in full[dataset])
                    + "."
                    if all("torch_threads" in row for row in full[dataset])
                    else " Torch threads and load were not recorded for these scoring runs (see Setup and limits)."
                ),
                "",
                "| score | seconds | what it includes |",
                "|---|---|---|",
                f"| training run on all rows (shared by all but random) | {train_seconds:.0f} | "
                f"{settings['epochs']} epoch(s) with snapshot recording and forgetting checks |",
                f"| MoSo | {np.mean(timing['moso']):.0f} | {full[dataset][0]['num_snapshots']} snapshots, all rows |",
                f"| EL2N | {np.mean(timing['el2n']):.1f} | forward passes at the snapshots of the first half of training |",
                f"| GraNd | {np.mean(timing['grand']):.0f} | per-row gradient norms at the same snapshots |",
                f"| forgetting events | {np.mean(timing['forgetting']):.1f} | {full[dataset][0]['forgetting_checks']} "
                "correctness checks during training (included in the training run) |",
                f"| random | {np.mean(timing['random']):.3f} | |",
                "",
                f"Settings: {settings['epochs']} epoch(s), batch size {settings['batch_size']}, AdamW peak learning rate "
                f"{settings['learning_rate']} with linear decay, MoSo snapshots {settings['num_snapshots']}, forgetting "
                f"checks {settings['forgetting_checks']}. Seeds of the pruned training {seeds}, seeds of the scoring "
                f"runs that chose the kept rows {pruning_score_seeds}"
                + "."
                + (
                    " With one scoring run, every seed prunes with the same scores, so the spread shows the variation"
                    " of training only, not of the scores."
                    if len(pruning_score_seeds) == 1 and len(seeds) > 1
                    else ""
                )
                + (
                    f" The scoring run(s) with seed(s) {agreement_only} only enter the agreement table and the timings."
                    f" The same command with `--seeds {' '.join(str(seed) for seed in agreement_only)}` and no"
                    " `--score_seed` runs them, and skips their pruned runs as already done."
                    if agreement_only
                    else ""
                ),
                "",
                "Command: `OMP_NUM_THREADS=1 python benchmarks/pruning.py --dataset "
                f"{dataset} --seeds {' '.join(str(seed) for seed in seeds)} "
                + (
                    f"--score_seed {pruning_score_seeds[0]} "
                    if len(pruning_score_seeds) == 1 and len(seeds) > 1
                    else ""
                )
                + f"--epochs {settings['epochs']} "
                f"--batch_size {settings['batch_size']} --learning_rate {settings['learning_rate']} "
                f"--num_snapshots {settings['num_snapshots']} --forgetting_checks {settings['forgetting_checks']}"
                + (
                    f" --moso_parameters {' '.join(settings['moso_parameters'])}"
                    if settings.get("moso_parameters")
                    else ""
                )
                + ("" if methods == DEFAULT_METHODS else f" --methods {' '.join(methods)}")
                + f" --results {os.path.relpath(results_path, REPOSITORY)}"
                + f" --work_dir {os.path.relpath(settings['work_dir'], REPOSITORY)}`",
                "",
            ]
    variants = {
        "pruning_first_settings.md": "the first settings, MNIST trained for 1 epoch with 5 MoSo snapshots and TREC "
        "with a head on frozen MiniLM embeddings, each scored once",
        "pruning_trec_10_snapshots.md": "TREC with a head on frozen MiniLM embeddings, 10 MoSo snapshots and one "
        "scoring run per seed",
        "pruning_trec_late_snapshots.md": "TREC with a head on frozen MiniLM embeddings, MoSo averaged over the "
        "snapshots of the second half of training only (10 snapshots recorded, one scoring run per seed)",
    }
    if markdown_name == "pruning.md":
        for name, description in variants.items():
            if os.path.isfile(os.path.join(REPOSITORY, "docs", name)):
                lines += [f"Variant: {description}, in `docs/{name}`.", ""]
    lines[summary_position:summary_position] = ["Summary:", "", *summary, ""]
    lines += [
        "## Setup and limits",
        "",
        "- Cuts made to fit the CPU time of a 2-core machine: small models trained for 1 to 5 epochs. Fine-tuned TREC",
        "  scores once (seed 0) and repeats the pruned training with 3 seeds. MoSo uses 5 snapshots where the Settings",
        "  line says so (the published MoSo code uses 10). Each table's Settings line gives its values.",
        "- Threads: the torch threads of each scoring run are listed with its timings where they were recorded. The",
        "  trec-frozen scoring run of `docs/pruning_first_settings.md` ran with 2 torch threads at a load average near",
        "  10; on that loaded 2-core machine 2 threads made steps several times slower, so its scoring times are not",
        "  comparable with the others. Accuracy does not depend on it.",
        "- Selection: MoSo with class-balanced quotas and with one global ranking; random, EL2N, GraNd and forgetting",
        "  events with a global ranking, as in their papers. Higher score = kept. Ties (frequent for forgetting counts)",
        "  are broken by row position.",
        "- EL2N and GraNd average over the MoSo snapshots of the first half of training of the same run (Paul et al.",
        "  average over independent initializations instead). Forgetting events are counted at evenly spaced",
        "  correctness checks of all training rows (see `ForgettingCallback`).",
        "- MNIST: the MNIST test set split 8000 / 2000 (stratified, seed 0), the recipe's small CNN",
        "  (`SmallCNNForImageClassification`, 8 channels) trained from scratch.",
        "- TREC (fine-tuned): all-MiniLM-L6-v2 as `BertForSequenceClassification` with a new 6-class head, every",
        "  parameter trained, questions cut to 32 tokens and padded per batch. MoSo and GraNd take the gradient over",
        "  the parameters named in the command (`--moso_parameters`; every trainable parameter when absent).",
        "- TREC (head on frozen MiniLM embeddings, `--dataset trec-frozen`, in the variants): the frozen encoder gives",
        "  each question its mean-pooled sentence embedding (its own pooling, max 32 tokens), computed once. A head of",
        "  dense 384-384 + tanh + dropout 0.1 + linear to 6 classes is trained from scratch on top.",
        "- Training on the kept rows: a plain PyTorch loop with the Trainer's updates (AdamW, linear decay, gradient",
        "  clipping at 1.0, a new shuffle per epoch), because the Trainer's per-step overhead was most of the time of",
        "  these small models on this machine. The scoring run on all rows uses `MoSoTrainer`.",
        "- Accuracy through `evaluate`: the Hub's `accuracy` metric, or `benchmarks/metrics/accuracy` when the Hub is",
        "  unreachable (it was unreachable here).",
        "",
        f"Report: `python benchmarks/pruning.py --report --results {os.path.relpath(results_path, REPOSITORY)}"
        f" --report_name {markdown_name}`. Date of the report: {today()}.",
        "",
        "Machines of the training runs (each result line records its machine):",
        "",
        *[
            f"- {', '.join(sorted(datasets))}: {machine}"
            for machine, datasets in sorted(machines_of(rows).items())
        ],
        "",
        *(
            ["The runs on the Intel Xeon machine shared it with other jobs (load average often above 8) at `nice -n 19`."]
            if any(machine.startswith("Intel(R) Xeon(R)") for machine in machines_of(rows))
            else []
        ),
        "",
    ]
    docs = os.path.join(REPOSITORY, "docs")
    with open(os.path.join(docs, markdown_name), "w", encoding="utf-8") as stream:
        stream.write("\n".join(lines))
    write_plot(accuracy, all_rows, os.path.join(docs, plot_name))
