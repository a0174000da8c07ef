"""
Wall time of MoSo scoring on 1 process against 2 processes on this machine (CPU, gloo).

The script writes snapshots of a small BERT classifier to a temporary folder, then launches the same scoring job
twice with `torch.distributed.run`: on 1 process, then on 2 processes with the rows split between them. Each
process uses `--threads` torch threads (default: cpu_count / processes, so that both runs use every core). It
prints, for each run, the wall
time of the whole launch (process start, imports, scoring), the time of `compute_moso_scores` alone, and the
largest relative difference of the scores from the 1-process scores.

Usage:
    python benchmarks/multiprocess_scoring.py [--rows 1024] [--batch-size 16] [--snapshots 2] [--threads N]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification


def build_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def build_dataset(num_rows: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 33, (num_rows,), generator=generator).tolist()
    input_ids = [torch.randint(1, 1000, (length,), generator=generator).tolist() for length in lengths]
    return Dataset.from_dict({"input_ids": input_ids, "label": [index % 2 for index in range(num_rows)]})


def collate(features: list[dict]) -> dict:
    longest = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.zeros(len(features), longest, dtype=torch.long)
    attention_mask = torch.zeros(len(features), longest, dtype=torch.long)
    for index, feature in enumerate(features):
        input_ids[index, : len(feature["input_ids"])] = torch.as_tensor(feature["input_ids"])
        attention_mask[index, : len(feature["input_ids"])] = 1
    labels = torch.tensor([feature["label"] for feature in features])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def write_snapshots(folder: str, num_snapshots: int) -> None:
    from hf_moso.snapshots import Manifest, Snapshot, file_sha256, snapshot_state, write_manifest

    names = [name for name, _ in build_model(0).named_parameters()]
    snapshots = []
    for index in range(num_snapshots):
        file = f"snapshot-step-{index + 1:08d}.safetensors"
        path = os.path.join(folder, file)
        save_file(snapshot_state(build_model(seed=index + 1)), path)
        rate = 1e-3 / (index + 1)
        snapshots.append(
            Snapshot(step=index + 1, learning_rate=rate, learning_rates=[rate], file=file, sha256=file_sha256(path))
        )
    manifest = Manifest(
        planned_steps=[snapshot.step for snapshot in snapshots],
        parameter_groups={name: 0 for name in names},
        snapshots=snapshots,
        max_steps=num_snapshots,
        model_class="BertForSequenceClassification",
    )
    write_manifest(folder, manifest)


def run_worker(arguments) -> None:
    """Score the rows in this process; process 0 writes the scores and the scoring time to `--output`."""
    from hf_moso import MoSoConfig, MoSoTrainer

    config = MoSoConfig(
        output_dir=os.path.join(os.path.dirname(arguments.output), "trainer"),
        moso_snapshot_dir=arguments.snapshot_folder,
        moso_batch_size=arguments.batch_size,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = MoSoTrainer(model=build_model(0), args=config, data_collator=collate)
    dataset = build_dataset(arguments.rows)
    torch.set_num_threads(threads_per_process(arguments, trainer.args.world_size))

    trainer.accelerator.wait_for_everyone()
    start = time.perf_counter()
    scores = trainer.compute_moso_scores(dataset)
    seconds = time.perf_counter() - start
    if trainer.args.process_index == 0:
        result = {
            "processes": trainer.args.world_size,
            "threads": torch.get_num_threads(),
            "scoring_seconds": seconds,
            "scores": scores.tolist(),
        }
        with open(arguments.output, "w") as stream:
            json.dump(result, stream)

    # A gloo process group still open when the interpreter exits can abort the process, so close it first.
    trainer.accelerator.end_training()


def threads_per_process(arguments, num_processes: int) -> int:
    if arguments.threads is not None:
        return arguments.threads
    return max(1, (os.cpu_count() or 1) // num_processes)


def launch(num_processes: int, arguments, folder: str) -> tuple[dict, float]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = os.path.join(folder, f"result-{num_processes}.json")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
        "--master_addr", "127.0.0.1", "--master_port", str(port), os.path.abspath(__file__), "--worker",
        "--snapshot-folder", os.path.join(folder, "snapshots"), "--output", output,
        "--rows", str(arguments.rows), "--batch-size", str(arguments.batch_size),
    ]  # fmt: skip
    if arguments.threads is not None:
        command += ["--threads", str(arguments.threads)]
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads_per_process(arguments, num_processes)))
    start = time.perf_counter()
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL)
    wall_seconds = time.perf_counter() - start
    with open(output) as stream:
        return json.load(stream), wall_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="number of scored rows")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per scoring batch")
    parser.add_argument("--snapshots", type=int, default=2, help="number of weight snapshots")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: cpu_count / processes)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--snapshot-folder", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        run_worker(arguments)
        return

    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "snapshots"))
        write_snapshots(os.path.join(folder, "snapshots"), arguments.snapshots)
        runs = [launch(num_processes, arguments, folder) for num_processes in (1, 2)]

    reference = np.asarray(runs[0][0]["scores"])
    print(
        f"MoSo scoring, {arguments.rows} rows, batch size {arguments.batch_size}, {arguments.snapshots} snapshots, "
        f"per-row backend, {os.cpu_count()} CPU cores"
    )
    print("processes  threads/process  launch wall s  scoring s  speed-up (scoring)  max relative score difference")
    for result, wall_seconds in runs:
        scores = np.asarray(result["scores"])
        difference = float(np.max(np.abs(scores - reference) / np.abs(reference)))
        speedup = runs[0][0]["scoring_seconds"] / result["scoring_seconds"]
        print(
            f"{result['processes']:>9}  {result['threads']:>15}  {wall_seconds:>13.1f}  "
            f"{result['scoring_seconds']:>9.1f}  {speedup:>18.2f}  {difference:>29.1e}"
        )


if __name__ == "__main__":
    main()
