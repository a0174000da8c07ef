"""
Train a tiny BERT sharded with torch FSDP2 next to a plain copy, record snapshots of both, and score 9 rows split
unevenly between the processes, so that a test can compare the sharded run with the plain one.

Usage (2 processes on CPU, gloo):
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT score_fsdp.py OUTPUT_FOLDER

Both models start from the same weights. At each of 3 steps, each process trains the sharded model on its half
of a global batch of 8 rows, and FSDP2 averages the gradients over the processes. The plain model trains on all 8
rows, so the weights of both stay equal up to float32 rounding. Snapshots go to OUTPUT_FOLDER/fsdp and OUTPUT_FOLDER/plain. Each
process writes OUTPUT_FOLDER/result-process-<index>.json with the scores of the sharded model (rows split between
processes, batch size 4) and of the plain model (all rows on each process), both on the sharded run's snapshots.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import TrainerState


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models import pad_collator, tiny_bert, token_dataset  # noqa: E402

from hf_moso import SnapshotRecorder, compute_moso_scores, read_manifest, select_parameters  # noqa: E402
from hf_moso.distributed import process_row_shard  # noqa: E402
from hf_moso.sharding import full_tensor  # noqa: E402


GLOBAL_BATCHES = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [15, 3, 11, 7, 1, 9, 13, 5]]
SCORED_ROWS = 9
SCORING_BATCH_SIZE = 4


def _train(model, rows_of_step, folder: str, rank: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    state = TrainerState(max_steps=len(rows_of_step), is_world_process_zero=rank == 0)
    recorder = SnapshotRecorder(folder, snapshot_steps=list(range(1, len(rows_of_step) + 1)))
    recorder.on_train_begin(None, state, None, model=model, optimizer=optimizer)

    model.train()
    for rows in rows_of_step:
        model(**pad_collator(rows)).loss.backward()
        recorder.on_pre_optimizer_step(None, state, None, model=model, optimizer=optimizer)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        state.global_step += 1


def _scores(model, rows, row_indices, folder: str):
    manifest = read_manifest(folder)
    parameters = select_parameters(model, None, manifest.parameter_groups)

    def batches():
        for start in range(0, len(rows), SCORING_BATCH_SIZE):
            yield pad_collator(rows[start : start + SCORING_BATCH_SIZE])

    return compute_moso_scores(
        model,
        batches,
        num_rows=SCORED_ROWS,
        snapshot_folder=folder,
        snapshots=manifest.snapshots,
        parameters=parameters,
        show_progress=False,
        row_indices=row_indices,
    )


def main(output_folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dataset = token_dataset(num_rows=16)
    rows = [dataset[index] for index in range(len(dataset))]

    sharded = tiny_bert(dropout=0.0)
    plain = tiny_bert(dropout=0.0)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in sharded.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)

    share = len(GLOBAL_BATCHES[0]) // world_size
    local_batches = [[rows[i] for i in batch[rank * share : (rank + 1) * share]] for batch in GLOBAL_BATCHES]
    _train(sharded, local_batches, os.path.join(output_folder, "fsdp"), rank)
    _train(plain, [[rows[i] for i in batch] for batch in GLOBAL_BATCHES], os.path.join(output_folder, "plain"), rank)
    dist.barrier()

    sharded.eval()
    before = {name: full_tensor(tensor).clone() for name, tensor in sharded.named_parameters()}
    row_indices = process_row_shard(SCORED_ROWS, SCORING_BATCH_SIZE)
    sharded_scores = _scores(sharded, [rows[i] for i in row_indices], row_indices, os.path.join(output_folder, "fsdp"))
    after = {name: full_tensor(tensor) for name, tensor in sharded.named_parameters()}
    plain_scores = _scores(plain, rows[:SCORED_ROWS], None, os.path.join(output_folder, "fsdp"))

    result = {
        "num_processes": world_size,
        "rows_of_process": list(row_indices),
        "sharded_parameters": [
            name for name, tensor in sharded.named_parameters() if type(tensor).__name__ == "DTensor"
        ],
        "weights_unchanged": all(torch.equal(before[name], after[name]) for name in before),
        "sharded_scores": sharded_scores.tolist(),
        "plain_scores": plain_scores.tolist(),
    }
    with open(os.path.join(output_folder, f"result-process-{rank}.json"), "w") as stream:
        json.dump(result, stream)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
