"""
Scoring and training with several processes: 2 CPU processes on gloo, launched in a subprocess by the scripts in
`tests/scripts`, compared with one process computed here.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file, save_file

from hf_moso import MoSoConfig, MoSoTrainer, NonFiniteLossError, compute_moso_scores, read_manifest
from hf_moso.distributed import gather_row_arrays, process_row_shard
from hf_moso.parameters import select_parameters
from hf_moso.scoring import PartialResults
from hf_moso.snapshots import Manifest, Snapshot, file_sha256, snapshot_state, write_manifest
from models import TinyCNN, image_dataset, pad_collator, tiny_bert, token_dataset


SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
sys.path.insert(0, SCRIPTS)

import score_fsdp  # noqa: E402
import score_shares  # noqa: E402
import train_ddp  # noqa: E402


LAUNCH_TIMEOUT_SECONDS = 600


@pytest.fixture
def one_thread():
    """Run torch on one thread, as each launched process does, so that two jobs do not fight over two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list[str]) -> str:
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_SECONDS, check=False
    )
    if completed.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited with status {completed.returncode}.\n"
            f"stdout (end):\n{completed.stdout[-3000:]}\nstderr (end):\n{completed.stderr[-6000:]}"
        )
    return completed.stdout


def _torchrun(script: str, *arguments: str) -> None:
    _run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            os.path.join(SCRIPTS, script), *arguments,
        ]
    )  # fmt: skip


def _accelerate_launch(script: str, *arguments: str) -> str:
    # The command of the README, with the port chosen free and the address pinned to this machine.
    return _run(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
            script if os.path.isabs(script) else os.path.join(SCRIPTS, script), *arguments,
        ]
    )  # fmt: skip


def _results(folder, name: str) -> list[dict]:
    results = []
    for index in range(2):
        with open(os.path.join(folder, f"{name}-process-{index}.json")) as stream:
            results.append(json.load(stream))
    return results


def _write_snapshots(folder: str) -> None:
    """Two snapshots of tiny BERTs with other seeds, biases and LayerNorm weights in a second parameter group."""
    os.makedirs(folder, exist_ok=True)
    names = [name for name, _ in tiny_bert().named_parameters()]
    groups = {name: int(name.endswith("bias") or "LayerNorm" in name) for name in names}
    snapshots = []
    for step, seed, rates in [(1, 1, [0.1, 0.2]), (5, 2, [0.05, 0.1])]:
        file = f"snapshot-step-{step:08d}.safetensors"
        path = os.path.join(folder, file)
        save_file(snapshot_state(tiny_bert(seed=seed)), path)
        snapshots.append(
            Snapshot(step=step, learning_rate=rates[0], learning_rates=rates, file=file, sha256=file_sha256(path))
        )
    manifest = Manifest(
        planned_steps=[1, 5],
        parameter_groups=groups,
        snapshots=snapshots,
        max_steps=8,
        model_class="BertForSequenceClassification",
    )
    write_manifest(folder, manifest)


def _assert_same_snapshots(folder, expected_folder, atol: float) -> None:
    manifest, expected = read_manifest(folder), read_manifest(expected_folder)
    assert [s.step for s in manifest.snapshots] == [s.step for s in expected.snapshots]
    assert [s.learning_rates for s in manifest.snapshots] == [s.learning_rates for s in expected.snapshots]
    assert manifest.parameter_groups == expected.parameter_groups
    for snapshot, expected_snapshot in zip(manifest.snapshots, expected.snapshots):
        tensors = load_file(os.path.join(folder, snapshot.file))
        expected_tensors = load_file(os.path.join(expected_folder, expected_snapshot.file))
        assert sorted(tensors) == sorted(expected_tensors)
        for name, tensor in expected_tensors.items():
            assert tensors[name].shape == tensor.shape, name
            torch.testing.assert_close(tensors[name], tensor, rtol=0, atol=atol, msg=f"{name}, step {snapshot.step}")


def test_shared_scores_match_single_process(tmp_path, one_thread):
    snapshot_folder = str(tmp_path / "snapshots")
    _write_snapshots(snapshot_folder)

    _accelerate_launch("score_shares.py", snapshot_folder, str(tmp_path))

    first, second = _results(tmp_path, "scores")
    expected_keys = {"per_sample/10-4-list"} | {
        f"{backend}/{rows}-{batch}"
        for backend in ("per_sample", "per_layer")
        for rows in (9, 10, 257)
        for batch in (1, 4, 16)
    }
    assert first["num_processes"] == 2
    assert set(first["scores"]) == expected_keys
    assert second["scores"] == first["scores"]
    for key, scores in first["scores"].items():
        backend, configuration = key.split("/")
        num_rows, batch_size = (int(part) for part in configuration.split("-")[:2])
        dataset = token_dataset(num_rows=num_rows)
        if configuration.endswith("list"):
            dataset = [dataset[index] for index in range(num_rows)]
        trainer = score_shares._trainer(snapshot_folder, str(tmp_path / "single"), batch_size, backend)
        expected = trainer.compute_moso_scores(dataset)
        np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-6, atol=0, err_msg=key)


def test_ddp_training_matches_single_process(tmp_path, one_thread):
    ddp_folder = tmp_path / "ddp"
    ddp_folder.mkdir()

    _torchrun("train_ddp.py", str(ddp_folder))

    first, second = _results(ddp_folder, "result")
    assert first["num_processes"] == 2
    assert second["scores"] == first["scores"]

    # One process with the same global batch size trains on the same rows at every step.
    single = MoSoTrainer(
        model=tiny_bert(dropout=0.0),
        args=train_ddp.config(str(tmp_path / "single"), per_device_train_batch_size=8),
        train_dataset=token_dataset(num_rows=train_ddp.NUM_ROWS),
        data_collator=pad_collator,
    )
    single.train()
    assert first["global_step"] == single.state.global_step
    _assert_same_snapshots(ddp_folder / "moso", single.args.moso_snapshot_folder, atol=1e-4)

    # On the snapshots of the DDP run, one process gives the scores that the 2 processes gave.
    single.args.moso_snapshot_dir = str(ddp_folder / "moso")
    expected = single.compute_moso_scores()
    np.testing.assert_allclose(np.asarray(first["scores"]), expected, rtol=1e-6, atol=0)


def test_fsdp_scores_match_plain_model(tmp_path):
    _torchrun("score_fsdp.py", str(tmp_path))

    first, second = _results(tmp_path, "result")
    assert first["num_processes"] == 2
    assert len(first["sharded_parameters"]) > 0
    assert first["rows_of_process"] == [0, 1, 2, 3]
    assert second["rows_of_process"] == [4, 5, 6, 7, 8]
    assert first["weights_unchanged"]
    assert second["weights_unchanged"]
    assert second["sharded_scores"] == first["sharded_scores"]
    np.testing.assert_allclose(first["sharded_scores"], first["plain_scores"], rtol=1e-5, atol=0)
    assert len(first["sharded_scores"]) == score_fsdp.SCORED_ROWS

    # Snapshots of the sharded model hold full tensors, equal to those of the plain model trained alongside.
    _assert_same_snapshots(tmp_path / "fsdp", tmp_path / "plain", atol=1e-4)


@pytest.mark.parametrize("num_processes", [1, 2, 3, 4])
def test_row_shards_cover_rows_once(num_processes):
    for num_rows in range(0, 41):
        for batch_size in range(1, 7):
            shards = [
                process_row_shard(num_rows, batch_size, num_processes=num_processes, process_index=index)
                for index in range(num_processes)
            ]
            assert [row for shard in shards for row in shard] == list(range(num_rows))
            for shard in shards:
                assert shard.step == 1
                assert shard.start % batch_size == 0 or shard.start == num_rows
            sizes = [len(shard) for shard in shards]
            assert max(sizes) - min(sizes) <= batch_size


def test_row_shard_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        process_row_shard(10, 0, num_processes=2, process_index=0)
    with pytest.raises(ValueError, match="process_index"):
        process_row_shard(10, 4, num_processes=2, process_index=2)
    with pytest.raises(ValueError, match="num_rows"):
        process_row_shard(-1, 4, num_processes=2, process_index=0)


def test_gather_orders_rows_by_position():
    values = np.array([[20.0, 2.0], [0.0, 0.0], [10.0, 1.0]])

    (ordered,) = gather_row_arrays([2, 0, 1], [values], num_rows=3)

    np.testing.assert_array_equal(ordered, [[0.0, 0.0], [10.0, 1.0], [20.0, 2.0]])


def test_gather_rejects_missing_and_repeated_rows():
    with pytest.raises(RuntimeError, match=r"held by no process: \[1\]"):
        gather_row_arrays([0, 2], [np.zeros(2)], num_rows=3)
    with pytest.raises(RuntimeError, match=r"held more than once: \[0\]"):
        gather_row_arrays([0, 0, 1, 2], [np.zeros(4)], num_rows=3)
    with pytest.raises(RuntimeError, match="outside"):
        gather_row_arrays([0, 1, 3], [np.zeros(3)], num_rows=3)


def _engine_inputs(tmp_path, num_rows: int):
    snapshot_folder = str(tmp_path / "snapshots")
    _write_snapshots(snapshot_folder)
    manifest = read_manifest(snapshot_folder)
    model = tiny_bert()
    parameters = select_parameters(model, None, manifest.parameter_groups)
    rows = [token_dataset(num_rows=num_rows)[index] for index in range(num_rows)]
    return model, parameters, rows, snapshot_folder, manifest.snapshots


def test_engine_reorders_rows_by_index(tmp_path, one_thread):
    model, parameters, rows, folder, snapshots = _engine_inputs(tmp_path, num_rows=7)
    order = [3, 6, 0, 5, 1, 4, 2]

    def batches_in(positions):
        return lambda: (pad_collator([rows[index]]) for index in positions)

    expected = compute_moso_scores(model, batches_in(range(7)), 7, folder, snapshots, parameters, show_progress=False)
    scores = compute_moso_scores(
        model, batches_in(order), 7, folder, snapshots, parameters, show_progress=False, row_indices=order
    )

    np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=0)


def test_engine_rejects_rows_that_miss_some(tmp_path):
    model, parameters, rows, folder, snapshots = _engine_inputs(tmp_path, num_rows=4)

    with pytest.raises(RuntimeError, match=r"held by no process: \[3\]"):
        compute_moso_scores(
            model,
            lambda: (pad_collator([rows[index]]) for index in range(3)),
            4,
            folder,
            snapshots,
            parameters,
            show_progress=False,
            row_indices=[0, 1, 2],
        )


def test_engine_names_non_finite_rows_by_position(tmp_path):
    dataset = image_dataset(num_rows=6)[:]
    pixels = dataset["pixel_values"].clone()
    pixels[4, 0, 0, 0] = float("nan")
    model = TinyCNN()
    folder = str(tmp_path / "snapshots")
    os.makedirs(folder)
    save_file(snapshot_state(model), os.path.join(folder, "snapshot.safetensors"))
    snapshot = Snapshot(
        step=1,
        learning_rate=0.1,
        learning_rates=[0.1],
        file="snapshot.safetensors",
        sha256=file_sha256(os.path.join(folder, "snapshot.safetensors")),
    )
    order = [5, 4, 3, 2, 1, 0]

    def batches():
        for start in range(0, 6, 2):
            positions = order[start : start + 2]
            yield {"pixel_values": pixels[positions], "labels": dataset["label"][positions]}

    with pytest.raises(NonFiniteLossError) as caught:
        compute_moso_scores(
            model, batches, 6, folder, [snapshot], select_parameters(model), show_progress=False, row_indices=order
        )
    assert caught.value.rows == [4]


def test_engine_rejects_row_indices_with_partial_results(tmp_path):
    model, parameters, rows, folder, snapshots = _engine_inputs(tmp_path, num_rows=4)
    partial_results = PartialResults(str(tmp_path / "partial"), "fingerprint")

    with pytest.raises(NotImplementedError, match="partial_results"):
        compute_moso_scores(
            model,
            lambda: (pad_collator([row]) for row in rows),
            4,
            folder,
            snapshots,
            parameters,
            partial_results=partial_results,
            row_indices=[0, 1, 2, 3],
        )


def test_config_rejects_deepspeed(tmp_path):
    with pytest.raises(ValueError, match="does not support DeepSpeed") as caught:
        MoSoConfig(output_dir=str(tmp_path), deepspeed={"zero_optimization": {"stage": 3}})
    assert "--multi_gpu" in str(caught.value)
    assert "FSDP2" in str(caught.value)


def test_config_rejects_deepspeed_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")

    with pytest.raises(ValueError, match="ACCELERATE_USE_DEEPSPEED"):
        MoSoConfig(output_dir=str(tmp_path))


def test_recipe_under_two_processes(tmp_path):
    output_dir = tmp_path / "digits"
    recipe = os.path.join(os.path.dirname(SCRIPTS), os.pardir, "recipes", "image_classification.py")

    stdout = _accelerate_launch(
        os.path.abspath(recipe),
        "--output_dir", str(output_dir), "--max_train_rows", "120", "--keep", "0.5", "--use_cpu",
        "--num_train_epochs", "1", "--moso_num_snapshots", "2", "--disable_tqdm", "true", "--seed", "0",
    )  # fmt: skip

    # Both processes score, the main process alone writes and prints, and both exit cleanly.
    assert stdout.count("MoSo pruning (class-balanced, keep=0.5): 120 rows before, 60 rows after") == 1
    assert stdout.count("Scoring 120 rows over 2 snapshots") == 1
    with open(output_dir / "moso_summary.json", encoding="utf-8") as stream:
        summary = json.load(stream)
    pruned = load_from_disk(str(output_dir / "pruned_dataset"))
    assert len(pruned) == summary["rows_after"] == 60
    assert np.isfinite(pruned["moso_score"]).all()
    assert summary["score_max"] == max(pruned["moso_score"])
    assert len(read_manifest(str(output_dir / "moso")).snapshots) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the processes would each get a GPU and train together")
def test_launch_without_use_cpu_rejected(tmp_path):
    _accelerate_launch("launch_without_cpu_flag.py", str(tmp_path))

    for rank in range(2):
        message = (tmp_path / f"error-process-{rank}.txt").read_text()
        assert "runs as 2 processes" in message
        assert "use_cpu=True" in message
