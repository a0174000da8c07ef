"""
Score token datasets of 9, 10 and 257 rows with batch sizes 1, 4 and 16 through `MoSoTrainer`, with each scoring
backend, rows split between the processes of the launch, and save the scores that each process returns.

Usage (2 processes on CPU):
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        --main_process_port PORT score_shares.py SNAPSHOT_FOLDER OUTPUT_FOLDER

Each process writes OUTPUT_FOLDER/scores-process-<index>.json, mapping "<backend>/<rows>-<batch size>" to the list
of scores in dataset row order. The "per_sample/10-4-list" entry scores the 10 rows given as a Python list instead
of a `datasets.Dataset`, which the trainer splits with `torch.utils.data.Subset`.
"""

import json
import os
import sys

import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models import pad_collator, tiny_bert, token_dataset  # noqa: E402

from hf_moso import MoSoConfig, MoSoTrainer, PerLayerBackend, PerSampleGradientBackend  # noqa: E402


ROW_COUNTS = (9, 10, 257)
BATCH_SIZES = (1, 4, 16)
BACKENDS = {"per_sample": PerSampleGradientBackend, "per_layer": PerLayerBackend}


def _trainer(snapshot_folder: str, output_folder: str, batch_size: int, backend: str) -> MoSoTrainer:
    args = MoSoConfig(
        output_dir=os.path.join(output_folder, "trainer"),
        moso_snapshot_dir=snapshot_folder,
        moso_batch_size=batch_size,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    return MoSoTrainer(model=tiny_bert(), args=args, data_collator=pad_collator, scoring_backend=BACKENDS[backend]())


def main(snapshot_folder: str, output_folder: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for backend in BACKENDS:
        for num_rows in ROW_COUNTS:
            for batch_size in BATCH_SIZES:
                trainer = _trainer(snapshot_folder, output_folder, batch_size, backend)
                scores = trainer.compute_moso_scores(token_dataset(num_rows=num_rows))
                results[f"{backend}/{num_rows}-{batch_size}"] = scores.tolist()

    rows = [token_dataset(num_rows=10)[index] for index in range(10)]
    trainer = _trainer(snapshot_folder, output_folder, 4, "per_sample")
    results["per_sample/10-4-list"] = trainer.compute_moso_scores(rows).tolist()

    with open(os.path.join(output_folder, f"scores-process-{trainer.args.process_index}.json"), "w") as stream:
        json.dump({"num_processes": trainer.args.world_size, "scores": results}, stream)

    # A gloo process group still open when the interpreter exits can abort the process, so close it first.
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
