"""Brute-force MoSo scores: one row at a time, with torch.autograd.grad over all scored parameters."""

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file


def brute_force_scores(model, rows: list[dict], snapshot_folder: str, parameter_names: list[str] | None = None):
    """
    M(z) = (1/T) sum_t eta_t * ((N gbar - g_z) / (N - 1)) . g_z, with g_z from a batch of one row and the model's
    own loss, gbar the mean of the g_z, in float64, in eval mode, at each snapshot's weights.

    `rows` are model inputs of batch size 1 (unpadded). Uses the learning rate of parameter group 0.
    """
    with open(os.path.join(snapshot_folder, "manifest.json")) as stream:
        manifest = json.load(stream)
    named = dict(model.named_parameters())
    names = parameter_names or [name for name, tensor in named.items() if tensor.requires_grad]
    tensors = [named[name] for name in names]
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    model.eval()
    num_rows = len(rows)
    scores = np.zeros(num_rows)
    for snapshot in manifest["snapshots"]:
        model.load_state_dict(load_file(os.path.join(snapshot_folder, snapshot["file"])), strict=False)
        gradients = []
        for row in rows:
            loss = model(**row).loss
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            flat = [torch.zeros(t.numel(), dtype=torch.float64) if g is None else g.reshape(-1).double()
                    for g, t in zip(grads, tensors)]
            gradients.append(torch.cat(flat))
        stacked = torch.stack(gradients)
        mean = stacked.mean(dim=0)
        for index in range(num_rows):
            others = (num_rows * mean - stacked[index]) / (num_rows - 1)
            scores[index] += snapshot["learning_rate"] * float(others @ stacked[index])
    model.load_state_dict(state)
    return scores / len(manifest["snapshots"])
