import json
import os

import torch
from safetensors.torch import load_file

from hf_moso import MoSoTrainer
from models import cpu_config, pad_collator, tiny_bert, token_dataset


class RecordingTrainer(MoSoTrainer):
    """Records the learning rate of every parameter group at the moment `optimizer.step()` runs."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        self.applied_learning_rates = []
        original_step = optimizer.step

        def step(*args, **kwargs):
            self.applied_learning_rates.append([group["lr"] for group in optimizer.param_groups])
            return original_step(*args, **kwargs)

        optimizer.step = step
        return optimizer


# Training settings of the runs in this file; each test may override some.
TRAINING = {"per_device_train_batch_size": 2, "learning_rate": 1e-2}


def _config(tmp_path, **overrides):
    return cpu_config(tmp_path / "out", **{**TRAINING, **overrides})


def _manifest(trainer):
    with open(os.path.join(trainer.args.moso_snapshot_folder, "manifest.json")) as stream:
        return json.load(stream)


def _train(tmp_path, dataset, **overrides):
    trainer = RecordingTrainer(
        model=tiny_bert(), args=_config(tmp_path, **overrides), train_dataset=dataset, data_collator=pad_collator
    )
    trainer.train()
    return trainer


def test_cosine_warmup_restarts_rates_match_optimizer(tmp_path):
    max_steps = 12
    trainer = _train(
        tmp_path,
        token_dataset(num_rows=24),
        max_steps=max_steps,
        warmup_steps=3,
        lr_scheduler_type="cosine_with_restarts",
        lr_scheduler_kwargs={"num_cycles": 2},
        moso_snapshot_steps=list(range(1, max_steps + 1)),
    )

    applied = trainer.applied_learning_rates
    recorded = {entry["step"]: entry for entry in _manifest(trainer)["snapshots"]}
    assert len(applied) == max_steps
    assert sorted(recorded) == list(range(1, max_steps + 1))
    for step, rates in enumerate(applied, start=1):
        assert recorded[step]["learning_rates"] == rates, f"step {step}"
        assert recorded[step]["learning_rate"] == rates[0], f"step {step}"

    # The schedule really warms up, decays and restarts, so a one-step offset would be caught.
    first_group = [rates[0] for rates in applied]
    assert first_group[0] == 0.0
    assert first_group[1] > first_group[0]
    restarts = [step for step in range(4, max_steps) if first_group[step] > first_group[step - 1]]
    assert restarts, first_group


def test_gradient_accumulation_rates_match_optimizer(tmp_path):
    trainer = _train(
        tmp_path,
        token_dataset(num_rows=16),
        num_train_epochs=2,
        gradient_accumulation_steps=2,
        lr_scheduler_type="linear",
        moso_num_snapshots=4,
    )

    applied = trainer.applied_learning_rates
    manifest = _manifest(trainer)
    # 16 rows in micro-batches of 2, accumulated 2 at a time, for 2 epochs: 8 optimizer steps.
    assert len(applied) == trainer.state.global_step == 8
    assert [entry["step"] for entry in manifest["snapshots"]] == [1, 3, 5, 7]
    for entry in manifest["snapshots"]:
        assert entry["learning_rates"] == applied[entry["step"] - 1], entry
    assert len({rates[0] for rates in applied}) == 8


def test_snapshot_holds_weights_before_step(tmp_path):
    dataset = token_dataset(num_rows=8)
    model = tiny_bert()
    initial = {name: tensor.detach().clone() for name, tensor in model.named_parameters()}
    trainer = MoSoTrainer(
        model=model,
        args=_config(tmp_path, max_steps=3, moso_snapshot_steps=[1, 3]),
        train_dataset=dataset,
        data_collator=pad_collator,
    )
    trainer.train()

    manifest = _manifest(trainer)
    first = load_file(os.path.join(trainer.args.moso_snapshot_folder, manifest["snapshots"][0]["file"]))
    for name, tensor in initial.items():
        assert torch.equal(first[name], tensor), name
    assert set(first) >= set(initial)


def test_snapshots_survive_rotation_and_resume(tmp_path):
    dataset = token_dataset(num_rows=12)
    steps = list(range(1, 7))
    common = dict(max_steps=6, moso_snapshot_steps=steps, save_strategy="steps", save_steps=2, save_total_limit=1)

    uninterrupted = MoSoTrainer(
        model=tiny_bert(), args=_config(tmp_path / "full", **common), train_dataset=dataset, data_collator=pad_collator
    )
    uninterrupted.train()
    full_manifest = _manifest(uninterrupted)
    checkpoints = sorted(name for name in os.listdir(uninterrupted.args.output_dir) if name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-6"]
    assert [entry["step"] for entry in full_manifest["snapshots"]] == steps
    for entry in full_manifest["snapshots"]:
        assert os.path.isfile(os.path.join(uninterrupted.args.moso_snapshot_folder, entry["file"]))

    # A first run stops after step 4; a second run resumes from its checkpoint.
    interrupted_args = _config(tmp_path / "resumed", **{**common, "save_total_limit": 2})
    first = MoSoTrainer(model=tiny_bert(), args=interrupted_args, train_dataset=dataset, data_collator=pad_collator)
    first.train()
    os.remove(os.path.join(interrupted_args.moso_snapshot_folder, "snapshot-step-00000006.safetensors"))
    checkpoint = os.path.join(interrupted_args.output_dir, "checkpoint-4")
    resumed = MoSoTrainer(
        model=tiny_bert(seed=1), args=interrupted_args, train_dataset=dataset, data_collator=pad_collator
    )
    resumed.train(resume_from_checkpoint=checkpoint)

    resumed_manifest = _manifest(resumed)
    assert [entry["step"] for entry in resumed_manifest["snapshots"]] == steps
    for full_entry, resumed_entry in zip(full_manifest["snapshots"], resumed_manifest["snapshots"]):
        assert resumed_entry["learning_rates"] == full_entry["learning_rates"]
        full_tensors = load_file(os.path.join(uninterrupted.args.moso_snapshot_folder, full_entry["file"]))
        resumed_tensors = load_file(os.path.join(interrupted_args.moso_snapshot_folder, resumed_entry["file"]))
        for name, tensor in full_tensors.items():
            torch.testing.assert_close(resumed_tensors[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
