"""
Train a tiny BERT with `MoSoTrainer` under DDP, then score the training rows, so that a test can compare the
snapshots, learning rates and scores with a single-process run of the same global batch size.

Usage (2 processes on CPU):
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT train_ddp.py OUTPUT_FOLDER

The model has no dropout, so that the training steps depend only on the rows of each global batch. Each process
writes OUTPUT_FOLDER/result-process-<index>.json with its scores and the learning rates it read from the
optimizer at each planned step; the snapshots are in OUTPUT_FOLDER/moso, written by the main process alone.
"""

import json
import os
import sys

import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models import pad_collator, tiny_bert, token_dataset  # noqa: E402

from hf_moso import MoSoConfig, MoSoTrainer  # noqa: E402


NUM_ROWS = 16
NUM_PROCESSES = 2


def config(output_folder: str, per_device_train_batch_size: int) -> MoSoConfig:
    """Training arguments of both runs; the single-process run uses a per-device batch twice as large."""
    return MoSoConfig(
        output_dir=output_folder,
        per_device_train_batch_size=per_device_train_batch_size,
        num_train_epochs=3,
        learning_rate=5e-2,
        lr_scheduler_type="linear",
        warmup_steps=2,
        weight_decay=0.01,
        moso_num_snapshots=4,
        moso_batch_size=3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        average_tokens_across_devices=False,
    )


def main(output_folder: str) -> None:
    torch.set_num_threads(1)
    trainer = MoSoTrainer(
        model=tiny_bert(dropout=0.0),
        args=config(output_folder, per_device_train_batch_size=4),
        train_dataset=token_dataset(num_rows=NUM_ROWS),
        data_collator=pad_collator,
    )
    trainer.train()
    scores = trainer.compute_moso_scores()

    result = {
        "num_processes": trainer.args.world_size,
        "global_step": trainer.state.global_step,
        "scores": scores.tolist(),
    }
    with open(os.path.join(output_folder, f"result-process-{trainer.args.process_index}.json"), "w") as stream:
        json.dump(result, stream)

    # A gloo process group still open when the interpreter exits can abort the process, so close it first.
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
