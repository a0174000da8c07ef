"""Resumable scoring: a job killed at any point resumes from its last saved piece with identical scores."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from hf_moso import MoSoTrainer, PartialResults, PerSampleGradientBackend, compute_moso_scores
from hf_moso.parameters import select_parameters
from hf_moso.scoring.resumable import CHUNK_DELAY_VARIABLE
from hf_moso.snapshots import read_manifest
from models import cpu_config, pad_collator, tiny_bert, token_dataset
from trained_run import hf_moso_command, run_cli, text_dataset, train_run


# The engine, in process: interruptions at chosen points.


class Interrupted(Exception):
    pass


class CountingBackend(PerSampleGradientBackend):
    """The reference backend, counting its passes and raising `Interrupted` at a chosen call, as a kill would."""

    def __init__(self, stop_at: tuple[str, int] | None = None):
        self.stop_at = stop_at
        self.calls = {"gradient_sum": 0, "row_statistics": 0}

    def _count(self, name: str) -> None:
        self.calls[name] += 1
        if self.stop_at == (name, self.calls[name]):
            raise Interrupted(f"{name} call {self.calls[name]}")

    def gradient_sum(self, model, batches, parameters):
        self._count("gradient_sum")
        return super().gradient_sum(model, batches, parameters)

    def row_statistics(self, model, batches, parameters, gradient_mean):
        self._count("row_statistics")
        return super().row_statistics(model, batches, parameters, gradient_mean)


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine_run")
    dataset = token_dataset(num_rows=11)
    model = tiny_bert()
    args = cpu_config(
        folder / "out",
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=5e-2,
        moso_num_snapshots=2,
    )
    MoSoTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collator).train()
    snapshot_folder = args.moso_snapshot_folder
    manifest = read_manifest(snapshot_folder)

    def batches():
        for start in range(0, len(dataset), 3):
            yield pad_collator([dataset[index] for index in range(start, min(start + 3, len(dataset)))])

    def score(backend, partial_results=None):
        return compute_moso_scores(
            model,
            batches,
            num_rows=len(dataset),
            snapshot_folder=snapshot_folder,
            snapshots=manifest.snapshots,
            parameters=select_parameters(model, None, manifest.parameter_groups),
            backend=backend,
            show_progress=False,
            partial_results=partial_results,
        )

    return {"score": score, "fingerprint": dataset._fingerprint, "expected": score(PerSampleGradientBackend())}


def _partial(folder, fingerprint, **overrides):
    options = {"chunk_rows": 4, "layout": {"batch_size": 3}}
    options.update(overrides)
    return PartialResults(str(folder), fingerprint, **options)


# 11 rows in batches of 3 and chunks of at least 4 rows: chunks of 6 and 5 rows, so 2 row_statistics calls and 1
# gradient_sum call per snapshot, over 2 snapshots.
@pytest.mark.parametrize(
    "stop_at, remaining",
    [
        (("gradient_sum", 1), {"gradient_sum": 2, "row_statistics": 4}),
        (("row_statistics", 2), {"gradient_sum": 1, "row_statistics": 3}),
        (("row_statistics", 3), {"gradient_sum": 0, "row_statistics": 2}),
        (("gradient_sum", 2), {"gradient_sum": 1, "row_statistics": 2}),
    ],
)
def test_engine_resume_is_bit_identical(engine_run, tmp_path, stop_at, remaining):
    folder = tmp_path / "partial"
    with pytest.raises(Interrupted):
        engine_run["score"](CountingBackend(stop_at), _partial(folder, engine_run["fingerprint"]))

    resumed_backend = CountingBackend()
    scores = engine_run["score"](resumed_backend, _partial(folder, engine_run["fingerprint"]))

    assert scores.tobytes() == engine_run["expected"].tobytes()
    assert resumed_backend.calls == remaining


def test_engine_complete_partial_results_skip_compute(engine_run, tmp_path):
    folder = tmp_path / "partial"
    engine_run["score"](CountingBackend(), _partial(folder, engine_run["fingerprint"]))

    backend = CountingBackend()
    scores = engine_run["score"](backend, _partial(folder, engine_run["fingerprint"]))

    assert backend.calls == {"gradient_sum": 0, "row_statistics": 0}
    assert scores.tobytes() == engine_run["expected"].tobytes()


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"dataset_fingerprint": "another-dataset"}, "dataset_fingerprint"),
        ({"chunk_rows": 5}, "chunk_rows"),
        ({"layout": {"batch_size": 4}}, "layout"),
    ],
)
def test_partial_results_key_mismatch_rejected(engine_run, tmp_path, overrides, named):
    folder = tmp_path / "partial"
    with pytest.raises(Interrupted):
        engine_run["score"](CountingBackend(("row_statistics", 2)), _partial(folder, engine_run["fingerprint"]))
    saved = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    fingerprint = overrides.pop("dataset_fingerprint", engine_run["fingerprint"])
    with pytest.raises(ValueError, match=named) as error:
        engine_run["score"](CountingBackend(), _partial(folder, fingerprint, **overrides))

    assert "delete" in str(error.value)
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == saved


def test_partial_results_other_parameters_rejected(tmp_path):
    partial = _partial(tmp_path / "partial", "rows")
    partial.open(10, ["a.weight", "a.bias"], "per_sample", "Model")
    partial.close()

    with pytest.raises(ValueError, match="parameter_names"):
        _partial(tmp_path / "partial", "rows").open(10, ["a.weight"], "per_sample", "Model")


def test_partial_results_folder_locked(tmp_path):
    first = _partial(tmp_path / "partial", "rows")
    first.open(10, ["a.weight"], "per_sample", "Model")

    with pytest.raises(ValueError, match="Another scoring job"):
        _partial(tmp_path / "partial", "rows").open(10, ["a.weight"], "per_sample", "Model")

    first.close()
    _partial(tmp_path / "partial", "rows").open(10, ["a.weight"], "per_sample", "Model")


def test_unreadable_piece_computed_again(engine_run, tmp_path):
    folder = tmp_path / "partial"
    with pytest.raises(Interrupted):
        engine_run["score"](CountingBackend(("row_statistics", 2)), _partial(folder, engine_run["fingerprint"]))
    (chunk,) = folder.rglob("rows-*.safetensors")
    chunk.write_bytes(chunk.read_bytes()[:20])
    (folder / ".key.json.tmp-12345").write_text("left by a killed job")

    backend = CountingBackend()
    scores = engine_run["score"](backend, _partial(folder, engine_run["fingerprint"]))

    assert scores.tobytes() == engine_run["expected"].tobytes()
    assert backend.calls == {"gradient_sum": 1, "row_statistics": 4}
    assert not (folder / ".key.json.tmp-12345").exists()


def test_piece_of_other_job_rejected(engine_run, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    engine_run["score"](CountingBackend(), _partial(first, engine_run["fingerprint"]))
    with pytest.raises(Interrupted):
        engine_run["score"](
            CountingBackend(("gradient_sum", 1)), _partial(second, engine_run["fingerprint"], chunk_rows=5)
        )
    for statistics in first.glob("*/statistics.safetensors"):
        target = second / statistics.parent.name / statistics.name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(statistics.read_bytes())

    with pytest.raises(ValueError, match="another scoring job"):
        engine_run["score"](CountingBackend(), _partial(second, engine_run["fingerprint"], chunk_rows=5))


# The command line: SIGKILL in the middle of a snapshot.


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    return train_run(str(tmp_path_factory.mktemp("cli_run")), num_rows=24, num_snapshots=3)


def _files(folder) -> dict:
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def _wait_for(pattern_folder, pattern: str, process: subprocess.Popen, log_path, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(pattern_folder) and any(name.startswith(pattern) for name in os.listdir(pattern_folder)):
            return
        if process.poll() is not None:
            raise AssertionError(
                f"hf-moso score exited with {process.returncode} first:\n{open(log_path).read()[-3000:]}"
            )
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"No {pattern} file appeared in {pattern_folder} within {timeout} s.")


def test_cli_score_killed_mid_snapshot_resumes_identically(cli_run, tmp_path):
    common = [cli_run["model_dir"], cli_run["dataset_dir"], "--batch_size", "4", "--chunk_rows", "4", "--no_progress"]
    uninterrupted = run_cli("score", *common, "--output", str(tmp_path / "uninterrupted"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    # Kill the job with SIGKILL once the first chunk of rows of the second snapshot is saved.
    output = tmp_path / "scores"
    partial = tmp_path / "scores.partial"
    second = read_manifest(os.path.join(cli_run["model_dir"], "moso")).snapshots[1].sha256
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            hf_moso_command() + ["score", *common, "--output", str(output)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **{CHUNK_DELAY_VARIABLE: "0.5"}),
        )
        _wait_for(partial / second, "rows-", process, log_path)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    assert not output.exists()
    first_snapshot = read_manifest(os.path.join(cli_run["model_dir"], "moso")).snapshots[0].sha256
    assert (partial / first_snapshot / "statistics.safetensors").is_file()
    assert not (partial / second / "statistics.safetensors").exists()
    assert (partial / second / "gradient-sum.safetensors").is_file()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".scores")]

    # Other rows in the same output folder are rejected and the partial results stay as they were.
    changed = text_dataset(24, seed=1)
    changed.save_to_disk(str(tmp_path / "changed"))
    saved = _files(partial)
    refused = run_cli("score", cli_run["model_dir"], str(tmp_path / "changed"), *common[2:], "--output", str(output))
    assert refused.returncode == 3
    assert refused.stderr.strip().splitlines()[-1].startswith("hf-moso: error: The partial results in")
    assert "dataset_fingerprint" in refused.stderr
    assert _files(partial) == saved
    assert not output.exists()

    resumed = run_cli("score", *common, "--output", str(output))
    assert resumed.returncode == 0, resumed.stderr
    assert "Reusing the saved statistics of the snapshot of step 1" in resumed.stderr
    assert "Reusing the saved gradient sum" in resumed.stderr

    expected = np.load(tmp_path / "uninterrupted" / "scores.npy")
    scores = np.load(output / "scores.npy")
    assert scores.dtype == np.float64
    assert scores.tobytes() == expected.tobytes()
    assert (
        load_from_disk(str(output))["moso_score"][:]
        == load_from_disk(str(tmp_path / "uninterrupted"))["moso_score"][:]
    )
    assert not partial.exists()
    info = json.loads((output / "moso_scores.json").read_text())
    assert info["num_rows"] == 24
    assert torch.from_numpy(scores).isfinite().all()
