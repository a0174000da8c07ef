"""Weight snapshots recorded during training and the manifest that lists them."""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .parameters import optimizer_parameter_groups
from .sharding import full_tensor, is_fsdp_model


logger = logging.get_logger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


@dataclass
class Snapshot:
    """
    One recorded optimizer step t: the weights w_t *before* the step and the learning rate eta_t the step applied.

    `step` counts optimizer steps from 1, as `TrainerState.global_step` does after the step. `learning_rates` has
    one entry per optimizer parameter group and `learning_rate` is the first of them. `file` is relative to the
    snapshot folder and `sha256` is the checksum of that file.
    """

    step: int
    learning_rate: float
    learning_rates: list[float]
    file: str
    sha256: str
    epoch: float | None = None


@dataclass
class Manifest:
    """
    Contents of `manifest.json` in a snapshot folder.

    `parameter_groups` maps every parameter name that the optimizer updates to its parameter group, so that a
    scored parameter gets the learning rate of its own group. `planned_steps` are the steps the run was set to
    record; `snapshots` are those recorded so far, in step order. `moso_parameters` are the parameter patterns the
    run was configured to score (`MoSoConfig.moso_parameters`, `None` for every trainable parameter); the snapshots
    hold every parameter regardless.
    """

    planned_steps: list[int]
    parameter_groups: dict[str, int]
    snapshots: list[Snapshot] = field(default_factory=list)
    max_steps: int | None = None
    model_class: str | None = None
    moso_parameters: list[str] | None = None
    format_version: int = MANIFEST_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        data = dict(data)
        data["snapshots"] = [Snapshot(**entry) for entry in data.get("snapshots", [])]
        return cls(**data)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so readers never see a partial file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def read_manifest(folder: str) -> Manifest:
    """
    Read the manifest of a snapshot folder.

    Raises:
        FileNotFoundError: when the folder contains no `manifest.json`.
        ValueError: when the manifest is not valid JSON or has an unknown format version.
    """
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No snapshot manifest at {path}. Train with `MoSoTrainer` first, or point `moso_snapshot_dir` at the "
            "folder of an earlier run."
        )
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
        manifest = Manifest.from_dict(data)
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"The snapshot manifest {path} is invalid: {error}. Record the snapshots again.") from error
    if manifest.format_version != MANIFEST_FORMAT_VERSION:
        raise ValueError(
            f"The snapshot manifest {path} has format version {manifest.format_version}; this version of hf-moso "
            f"reads version {MANIFEST_FORMAT_VERSION}."
        )
    return manifest


def write_manifest(folder: str, manifest: Manifest) -> None:
    write_atomically(os.path.join(folder, MANIFEST_NAME), manifest.to_json())


def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """
    Copy the parameters and persistent buffers of `model` to CPU, keyed by their names.

    Parameters come from `model.named_parameters()`, which lists a tied weight once, so the result holds no shared
    storage and safetensors can write it. The shards of a sharded tensor (an FSDP2 `DTensor`) are gathered into the
    full tensor, a collective operation that every process must join.
    """
    state = {name: full_tensor(tensor).to("cpu", copy=True).contiguous() for name, tensor in model.named_parameters()}
    non_persistent = set()
    for module_name, module in model.named_modules():
        for buffer_name in getattr(module, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    for name, tensor in model.named_buffers():
        if name not in non_persistent and name not in state:
            state[name] = full_tensor(tensor).to("cpu", copy=True).contiguous()
    return state


def load_snapshot(folder: str, snapshot: Snapshot, verify: bool = True) -> dict[str, torch.Tensor]:
    """
    Read the tensors of `snapshot` with safetensors (nothing is unpickled).

    Raises:
        FileNotFoundError: when the snapshot file is missing.
        ValueError: when `verify` is set and the file does not match the checksum in the manifest.
    """
    path = os.path.join(folder, snapshot.file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The snapshot of step {snapshot.step} is missing: {path}. Record the snapshots again by training."
        )
    if verify:
        checksum = file_sha256(path)
        if checksum != snapshot.sha256:
            raise ValueError(
                f"The snapshot file {path} (step {snapshot.step}) does not match its checksum in the manifest "
                f"(sha256 {checksum} instead of {snapshot.sha256}); it was changed or is corrupt. Record the "
                "snapshots again by training."
            )
    return load_file(path)


def evenly_spaced_steps(max_steps: int, num_snapshots: int) -> list[int]:
    """
    Spread `num_snapshots` optimizer steps evenly over steps 1..`max_steps`, starting at step 1.

    Example:
        >>> evenly_spaced_steps(100, 4)
        [1, 26, 51, 76]
    """
    count = min(num_snapshots, max_steps)
    return [1 + (index * max_steps) // count for index in range(count)]


class SnapshotRecorder(TrainerCallback):
    """
    Record MoSo snapshots while `Trainer` trains.

    At each planned optimizer step k, `on_pre_optimizer_step` runs after the gradients of step k are complete
    (after every accumulated micro-batch) and before `optimizer.step()`. The weights are therefore still w_k, and
    each parameter group's `lr` is the rate that `optimizer.step()` is about to apply. The scheduler moves the rate
    only after `on_optimizer_step`, so this reading is right under warmup, decay, restarts and gradient
    accumulation.

    Snapshots are written to `folder` as `snapshot-step-XXXXXXXX.safetensors`, then the manifest is rewritten
    atomically. On resume from a checkpoint, entries recorded after the checkpoint's step are dropped and
    recorded again. Only the main process writes.
    """

    def __init__(self, folder: str, num_snapshots: int = 10, snapshot_steps: list[int] | None = None):
        self.folder = folder
        self.num_snapshots = num_snapshots
        self.snapshot_steps = snapshot_steps
        self.manifest: Manifest | None = None
        self._planned: set[int] = set()

    def _plan(self, max_steps: int) -> list[int]:
        if self.snapshot_steps is None:
            steps = evenly_spaced_steps(max_steps, self.num_snapshots)
            if len(steps) < self.num_snapshots:
                logger.warning(
                    f"Training has only {max_steps} optimizer steps, fewer than moso_num_snapshots="
                    f"{self.num_snapshots}; recording {len(steps)} snapshots, one per step."
                )
            return steps
        beyond = [step for step in self.snapshot_steps if step > max_steps]
        if beyond:
            raise ValueError(
                f"`moso_snapshot_steps` contains steps {beyond} beyond the last optimizer step ({max_steps}) of this "
                "training run. Use steps between 1 and max_steps."
            )
        return list(self.snapshot_steps)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        planned = self._plan(state.max_steps)
        self._planned = set(planned)
        groups = optimizer_parameter_groups(model, optimizer)

        resumed = None
        if state.global_step > 0 and os.path.isfile(os.path.join(self.folder, MANIFEST_NAME)):
            resumed = read_manifest(self.folder)
            if resumed.planned_steps != planned:
                logger.warning(
                    f"The snapshot manifest in {self.folder} planned steps {resumed.planned_steps}, this run plans "
                    f"{planned}; recording the new plan from step {state.global_step + 1} on."
                )
        elif state.global_step > 0:
            logger.warning(
                f"Resuming at step {state.global_step} without a snapshot manifest in {self.folder}; snapshots "
                "planned before this step are missing."
            )

        kept = []
        if resumed is not None:
            kept = [snapshot for snapshot in resumed.snapshots if snapshot.step <= state.global_step]
        self.manifest = Manifest(
            planned_steps=planned,
            parameter_groups=groups,
            snapshots=kept,
            max_steps=state.max_steps,
            model_class=type(model).__name__,
            moso_parameters=getattr(args, "moso_parameters", None),
        )

        if state.is_world_process_zero:
            os.makedirs(self.folder, exist_ok=True)
            if resumed is None and os.path.isfile(os.path.join(self.folder, MANIFEST_NAME)):
                logger.warning(f"Replacing the snapshots of an earlier run in {self.folder}.")
            write_manifest(self.folder, self.manifest)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        if step not in self._planned:
            return
        learning_rates = [float(group["lr"]) for group in optimizer.param_groups]

        # Gathering the shards of an FSDP2 model is a collective operation, so every process takes part in it.
        if not state.is_world_process_zero and not is_fsdp_model(model):
            return
        tensors = snapshot_state(model)
        if not state.is_world_process_zero:
            return

        file_name = f"snapshot-step-{step:08d}.safetensors"
        path = os.path.join(self.folder, file_name)
        temporary = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, temporary, metadata={"step": str(step)})
        os.replace(temporary, path)

        snapshot = Snapshot(
            step=step,
            learning_rate=learning_rates[0],
            learning_rates=learning_rates,
            file=file_name,
            sha256=file_sha256(path),
            epoch=state.epoch,
        )
        self.manifest.snapshots = [entry for entry in self.manifest.snapshots if entry.step != step] + [snapshot]
        self.manifest.snapshots.sort(key=lambda entry: entry.step)
        write_manifest(self.folder, self.manifest)
        logger.info(f"Recorded MoSo snapshot of step {step} (learning rates {learning_rates}) in {path}.")


def snapshot_shapes(folder: str, snapshot: Snapshot) -> dict[str, tuple[int, ...]]:
    """
    Read the tensor names and shapes of `snapshot` from its safetensors header, without reading the tensors.

    Raises:
        FileNotFoundError: when the snapshot file is missing.
        ValueError: when the file is not a readable safetensors file.
    """
    path = os.path.join(folder, snapshot.file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The snapshot of step {snapshot.step} is missing: {path}. Record the snapshots again by training."
        )
    try:
        with safe_open(path, framework="pt") as stream:
            return {name: tuple(stream.get_slice(name).get_shape()) for name in stream.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"The snapshot file {path} (step {snapshot.step}) is not a readable safetensors file ({error}); it is "
            "corrupt. Record the snapshots again by training."
        ) from error
