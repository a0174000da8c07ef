"""Training arguments of `MoSoTrainer`."""

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .parameters import PRESET_PREFIX, parse_preset


def _reject_deepspeed(deepspeed) -> None:
    # The snapshot recorder and the scoring backends read named per-layer parameters, which ZeRO stage 3 replaces
    # by partitioned flat buffers; no stage is tested, so DeepSpeed is rejected as a whole.
    from_launcher = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "y", "yes", "t", "true", "on")
    if not deepspeed and not from_launcher:
        return
    if deepspeed:
        source = f"`deepspeed={deepspeed!r}`"
    else:
        source = "ACCELERATE_USE_DEEPSPEED=true (set by `accelerate launch` with a DeepSpeed configuration)"
    raise ValueError(
        f"MoSoTrainer does not support DeepSpeed, got {source}. Train on several GPUs with DDP (`accelerate launch "
        "--multi_gpu`), or shard the model with FSDP2 (`fsdp=\"full_shard\"` with `fsdp_config={\"version\": 2}`, "
        "or `fully_shard` from `torch.distributed.fsdp`), and remove the DeepSpeed setting."
    )


@dataclass
class MoSoConfig(TrainingArguments):
    r"""
    Configuration of [`MoSoTrainer`]: the usual [`~transformers.TrainingArguments`] plus the fields that control
    what MoSo records during training and how it scores rows afterwards.

    Every field added here starts with `moso_`; all other fields mean what they mean in `TrainingArguments`, and
    no default of the parent class is changed.

    Snapshots:
        moso_num_snapshots (`int`, *optional*, defaults to `10`):
            Number T of weight snapshots recorded during training, spread evenly over the optimizer steps. The
            published MoSo code uses 10. Ignored when `moso_snapshot_steps` is given.
        moso_snapshot_steps (`list[int]`, *optional*):
            Explicit optimizer steps at which to record a snapshot, counted from 1 as `TrainerState.global_step`
            counts them. The snapshot of step k contains the weights *before* step k together with the learning rate
            step k applied.
        moso_snapshot_dir (`str`, *optional*):
            Folder of the snapshots and of their `manifest.json`. Defaults to `<output_dir>/moso`, which checkpoint
            rotation (`save_total_limit`) never touches.

    Scoring:
        moso_parameters (`list[str]`, *optional*):
            Shell-style patterns (`fnmatch`) on the names of `model.named_parameters()` selecting the scored
            parameters, and presets that select trainable parameters by role: `preset:head` (the task head),
            `preset:last_blocks:K` (the last K repeated blocks and every module after them; K defaults to 1),
            `preset:adapters` (PEFT adapter layers such as LoRA) and `preset:trainable`. A parameter is scored when
            any entry selects it. Defaults to every trainable parameter.
        moso_batch_size (`int`, *optional*):
            Rows per forward pass when scoring. Defaults to `per_device_eval_batch_size`. The scores do not depend on
            it; only speed and memory do.
    """

    moso_num_snapshots: int = field(
        default=10,
        metadata={"help": "Number of weight snapshots recorded during training, spread evenly over the optimizer steps."},
    )
    moso_snapshot_steps: list[int] | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps (counted from 1) at which to record a snapshot; overrides `moso_num_snapshots`."
        },
    )
    moso_snapshot_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the snapshots and their manifest. Defaults to `<output_dir>/moso`."},
    )
    moso_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "fnmatch patterns on parameter names, or presets (preset:head, preset:last_blocks:K, "
            "preset:adapters, preset:trainable), selecting the scored parameters. Default: all trainable."
        },
    )
    moso_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per forward pass when scoring. Defaults to `per_device_eval_batch_size`."},
    )

    def __post_init__(self):
        # Checked before the parent's checks, which fail with an import error when DeepSpeed is not installed.
        _reject_deepspeed(self.deepspeed)
        super().__post_init__()

        # The estimator averages over snapshots, so it needs at least one.
        if isinstance(self.moso_num_snapshots, bool) or not isinstance(self.moso_num_snapshots, int):
            raise TypeError(f"`moso_num_snapshots` must be an int, got {self.moso_num_snapshots!r}.")
        if self.moso_num_snapshots < 1:
            raise ValueError(
                f"`moso_num_snapshots` must be at least 1, got {self.moso_num_snapshots}. "
                "Set it to the number of weight snapshots to record (the published MoSo code uses 10)."
            )

        if self.moso_snapshot_steps is not None:
            steps = list(self.moso_snapshot_steps)
            if len(steps) == 0:
                raise ValueError(
                    "`moso_snapshot_steps` is empty. Give at least one optimizer step, or leave it unset to spread "
                    "`moso_num_snapshots` snapshots over training."
                )
            for step in steps:
                if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                    raise ValueError(
                        f"`moso_snapshot_steps` contains {step!r}; every entry must be an optimizer step number "
                        "counted from 1."
                    )
            if len(set(steps)) != len(steps):
                raise ValueError(f"`moso_snapshot_steps` contains duplicate steps: {steps}. List each step once.")
            self.moso_snapshot_steps = sorted(steps)

        if self.moso_parameters is not None:
            if isinstance(self.moso_parameters, str):
                raise TypeError(
                    f"`moso_parameters` must be a list of name patterns, got the string {self.moso_parameters!r}. "
                    f"Wrap it in a list: [{self.moso_parameters!r}]."
                )
            if len(self.moso_parameters) == 0:
                raise ValueError(
                    "`moso_parameters` is an empty list, so no parameter would be scored. Leave it unset to score "
                    "every trainable parameter."
                )
            for entry in self.moso_parameters:
                if isinstance(entry, str) and entry.startswith(PRESET_PREFIX):
                    parse_preset(entry)

        if self.moso_batch_size is not None and (
            isinstance(self.moso_batch_size, bool) or not isinstance(self.moso_batch_size, int) or self.moso_batch_size < 1
        ):
            raise ValueError(f"`moso_batch_size` must be a positive int, got {self.moso_batch_size!r}.")

    @property
    def moso_snapshot_folder(self) -> str:
        """Folder where the snapshots and `manifest.json` are written."""
        if self.moso_snapshot_dir is not None:
            return self.moso_snapshot_dir
        return os.path.join(self.output_dir, "moso")

    @property
    def moso_scoring_batch_size(self) -> int:
        """Rows per forward pass when scoring."""
        if self.moso_batch_size is not None:
            return self.moso_batch_size
        return self.per_device_eval_batch_size
