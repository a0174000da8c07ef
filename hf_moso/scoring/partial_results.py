"""A folder of partial MoSo results, written piece by piece so that an interrupted scoring job can resume."""

import hashlib
import json
import os

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from transformers.utils import logging

from ..snapshots import Snapshot
from .base import GradientStatistics


try:
    import fcntl
except ImportError:  # Windows has no fcntl; the folder is then not locked against a second job.
    fcntl = None


logger = logging.get_logger(__name__)

PARTIAL_RESULTS_FORMAT_VERSION = 1
KEY_NAME = "key.json"
LOCK_NAME = "lock"
GRADIENT_SUM_NAME = "gradient-sum.safetensors"
STATISTICS_NAME = "statistics.safetensors"
DEFAULT_CHUNK_ROWS = 1024


def write_bytes_atomically(path: str, data: bytes) -> None:
    """
    Write `data` to `path` through a temporary file in the same folder, `fsync` and a rename.

    A reader (or a job that restarts after a kill) finds either the complete file or no file at all.
    """
    folder = os.path.dirname(path) or "."
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(temporary, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    # The rename is durable only once the folder entry is on disk; some file systems cannot open a folder.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class PartialResults:
    """
    Partial MoSo results in a folder: per snapshot, the gradient sum of pass 1, the row statistics of pass 2 in
    chunks of rows, and the complete statistics once the snapshot is done.

    Every file is written atomically (temporary file, `fsync`, rename), so a job killed at any point, SIGKILL
    included, leaves only complete pieces. A rerun with the same `PartialResults` reuses them and computes the
    rest. All values are stored as float64 safetensors exactly as computed, so a resumed job returns the same
    scores, bit for bit, as an uninterrupted one whenever two uninterrupted runs agree bit for bit.

    NOTE: that holds on CPU (tested). CUDA kernels that accumulate with atomics, such as the embedding backward
    pass, can differ between runs unless `torch.use_deterministic_algorithms(True)` is set; this was not tested.

    The folder is bound to a key: the dataset fingerprint, the number of rows, the scored parameter names, the
    backend, the model class, `chunk_rows` and `layout` (for example the batch size, since padding and
    summation order change the last bits). A job whose key differs from the one saved in `key.json` is rejected
    with a `ValueError` that names the differing entries, so results of different data or settings are never
    mixed. Pieces of a snapshot are kept in a subfolder named after the snapshot's sha256, so other weights can
    never match them. While a job uses the folder it holds an exclusive lock on it (on systems with `fcntl`).

    Args:
        folder: the folder of the partial results; created when missing.
        dataset_fingerprint: identifies the scored rows and their content, for example `Dataset._fingerprint`.
        chunk_rows: rows per saved piece of pass 2. A chunk ends at the first batch boundary at or after this
            many rows, so a chunk may hold up to one batch more.
        layout: other settings that change the computed numbers, as JSON-serializable values.

    Example:
        ```python
        partial = PartialResults("scores.partial", dataset._fingerprint, layout={"batch_size": 16})
        scores = compute_moso_scores(..., partial_results=partial)
        ```
    """

    def __init__(
        self,
        folder: str,
        dataset_fingerprint: str,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        layout: dict | None = None,
    ):
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"`chunk_rows` must be a positive int (rows per saved piece), got {chunk_rows!r}.")
        if not isinstance(dataset_fingerprint, str) or not dataset_fingerprint:
            raise ValueError(
                f"`dataset_fingerprint` must be a non-empty string, got {dataset_fingerprint!r}. Use the "
                "`_fingerprint` of a `datasets.Dataset`, or any string that changes whenever the rows change."
            )
        self.folder = folder
        self.dataset_fingerprint = dataset_fingerprint
        self.chunk_rows = chunk_rows
        self.layout = dict(layout or {})
        self.key: dict | None = None
        self._key_digest: str | None = None
        self._lock = None

    # Key and lock.

    def _job_key(self, num_rows: int, parameter_names: list[str], backend_name: str, model_class: str) -> dict:
        return {
            "format_version": PARTIAL_RESULTS_FORMAT_VERSION,
            "dataset_fingerprint": self.dataset_fingerprint,
            "num_rows": int(num_rows),
            "parameter_names": list(parameter_names),
            "backend": backend_name,
            "model_class": model_class,
            "chunk_rows": self.chunk_rows,
            "layout": json.loads(json.dumps(self.layout)),
        }

    def check(self, num_rows: int, parameter_names: list[str], backend_name: str, model_class: str) -> None:
        """
        Check the key saved in the folder, if any, against this job's key, and write nothing.

        Call it before writing anything else for the job, so that a job that would be rejected changes nothing.

        Raises:
            ValueError: when the saved key differs from this job's key.
        """
        if os.path.isfile(os.path.join(self.folder, KEY_NAME)):
            self._compare_key(self._job_key(num_rows, parameter_names, backend_name, model_class))

    def open(self, num_rows: int, parameter_names: list[str], backend_name: str, model_class: str) -> None:
        """
        Bind the folder to the key of this job: create it, or check the key of the job that created it.

        Raises:
            ValueError: when the saved key differs from this job's key, or when another job has locked the folder.
        """
        key = self._job_key(num_rows, parameter_names, backend_name, model_class)
        os.makedirs(self.folder, exist_ok=True)
        self._acquire_lock()
        try:
            path = os.path.join(self.folder, KEY_NAME)
            if os.path.isfile(path):
                self._compare_key(key)
                logger.info(f"Resuming from the partial results in {self.folder}.")
            else:
                write_bytes_atomically(path, (json.dumps(key, indent=2, sort_keys=True) + "\n").encode())
            self._remove_temporary_files()
        except BaseException:
            self.close()
            raise
        self.key = key
        self._key_digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def close(self) -> None:
        """Release the lock on the folder; the saved pieces stay."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _acquire_lock(self) -> None:
        path = os.path.join(self.folder, LOCK_NAME)
        stream = open(path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                stream.close()
                raise ValueError(
                    f"Another scoring job is using the partial results in {self.folder}. Wait for it to finish, or "
                    "give this job another output folder."
                ) from error
        self._lock = stream

    def _compare_key(self, key: dict) -> None:
        path = os.path.join(self.folder, KEY_NAME)
        try:
            with open(path, encoding="utf-8") as stream:
                saved = json.load(stream)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"The partial results key {path} cannot be read ({error}). Delete the folder {self.folder} to start "
                "scoring over."
            ) from error

        differences = []
        for name, value in key.items():
            if saved.get(name) != value:
                differences.append(f"{name}: saved {_shorten(saved.get(name))}, this job {_shorten(value)}")
        if differences:
            raise ValueError(
                f"The partial results in {self.folder} belong to another scoring job ({'; '.join(differences)}); "
                "they are never mixed with this one. Rerun with the settings and data of that job to resume it, or "
                f"delete {self.folder} to start over."
            )

    def _remove_temporary_files(self) -> None:
        # Left by a job killed while writing; the lock guarantees that no live job is still writing them.
        for root, _, files in os.walk(self.folder):
            for name in files:
                if name.startswith(".") and ".tmp-" in name:
                    os.remove(os.path.join(root, name))

    # Pieces of one snapshot.

    def _snapshot_folder(self, snapshot: Snapshot) -> str:
        return os.path.join(self.folder, snapshot.sha256)

    def _save(self, path: str, tensors: dict[str, torch.Tensor], snapshot: Snapshot) -> None:
        if self._key_digest is None:
            raise RuntimeError("Call `PartialResults.open` before saving partial results.")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        metadata = {"key": self._key_digest, "snapshot_sha256": snapshot.sha256}
        write_bytes_atomically(path, save({name: tensor.contiguous() for name, tensor in tensors.items()}, metadata))

    def _load(self, path: str, snapshot: Snapshot) -> dict[str, torch.Tensor] | None:
        if not os.path.isfile(path):
            return None
        try:
            with open(path, "rb") as stream:
                data = stream.read()
            tensors = load(data)
            metadata = _metadata(data)
        except (OSError, SafetensorError, ValueError) as error:
            logger.warning(f"Ignoring the unreadable partial result {path} ({error}); computing it again.")
            os.remove(path)
            return None
        if metadata.get("key") != self._key_digest or metadata.get("snapshot_sha256") != snapshot.sha256:
            raise ValueError(
                f"The partial result {path} was written by another scoring job (its key differs from {KEY_NAME}). "
                f"Delete {self.folder} to start over."
            )
        return tensors

    def load_gradient_sum(self, snapshot: Snapshot, parameter_names: list[str]) -> list[torch.Tensor] | None:
        """Return the saved pass-1 gradient sum of `snapshot`, one float64 tensor per parameter, or `None`."""
        tensors = self._load(os.path.join(self._snapshot_folder(snapshot), GRADIENT_SUM_NAME), snapshot)
        if tensors is None:
            return None
        if sorted(tensors) != sorted(parameter_names):
            raise ValueError(
                f"The saved gradient sum of step {snapshot.step} in {self.folder} covers other parameters. Delete "
                f"{self.folder} to start over."
            )
        return [tensors[name] for name in parameter_names]

    def save_gradient_sum(self, snapshot: Snapshot, parameter_names: list[str], gradient_sum: list[torch.Tensor]):
        """Save the pass-1 gradient sum of `snapshot` (float64, on CPU)."""
        tensors = {name: total.detach().to("cpu", torch.float64) for name, total in zip(parameter_names, gradient_sum)}
        self._save(os.path.join(self._snapshot_folder(snapshot), GRADIENT_SUM_NAME), tensors, snapshot)

    def find_row_chunk(self, snapshot: Snapshot, start: int) -> tuple[int, GradientStatistics] | None:
        """Return `(end, statistics)` of the saved chunk of pass 2 that starts at row `start`, or `None`."""
        folder = self._snapshot_folder(snapshot)
        if not os.path.isdir(folder):
            return None
        prefix = f"rows-{start:012d}-"
        for name in sorted(os.listdir(folder)):
            if name.startswith(prefix) and name.endswith(".safetensors"):
                end = int(name[len(prefix) : -len(".safetensors")])
                tensors = self._load(os.path.join(folder, name), snapshot)
                if tensors is not None:
                    return end, _statistics_from(tensors, end - start, name)
        return None

    def save_row_chunk(self, snapshot: Snapshot, start: int, statistics: GradientStatistics) -> None:
        """Save the pass-2 statistics of the rows `start` to `start + len(statistics.mean_dot)` of `snapshot`."""
        end = start + statistics.mean_dot.shape[0]
        path = os.path.join(self._snapshot_folder(snapshot), f"rows-{start:012d}-{end:012d}.safetensors")
        self._save(path, _tensors_from(statistics), snapshot)

    def load_statistics(self, snapshot: Snapshot) -> GradientStatistics | None:
        """Return the complete statistics of `snapshot` when a job finished it, else `None`."""
        tensors = self._load(os.path.join(self._snapshot_folder(snapshot), STATISTICS_NAME), snapshot)
        if tensors is None:
            return None
        return _statistics_from(tensors, self.key["num_rows"], STATISTICS_NAME)

    def save_statistics(self, snapshot: Snapshot, statistics: GradientStatistics) -> None:
        """Save the complete statistics of `snapshot`, then delete its gradient sum and row chunks."""
        folder = self._snapshot_folder(snapshot)
        self._save(os.path.join(folder, STATISTICS_NAME), _tensors_from(statistics), snapshot)
        for name in os.listdir(folder):
            if name == GRADIENT_SUM_NAME or name.startswith("rows-"):
                os.remove(os.path.join(folder, name))


def _tensors_from(statistics: GradientStatistics) -> dict[str, torch.Tensor]:
    return {
        "mean_dot": torch.from_numpy(np.ascontiguousarray(statistics.mean_dot, dtype=np.float64)),
        "squared_norm": torch.from_numpy(np.ascontiguousarray(statistics.squared_norm, dtype=np.float64)),
    }


def _statistics_from(tensors: dict[str, torch.Tensor], num_rows: int, name: str) -> GradientStatistics:
    mean_dot, squared_norm = tensors.get("mean_dot"), tensors.get("squared_norm")
    if (
        mean_dot is None
        or squared_norm is None
        or mean_dot.shape[0] != num_rows
        or mean_dot.shape != squared_norm.shape
    ):
        raise ValueError(f"The partial result {name} does not hold statistics of {num_rows} rows; delete its folder.")
    return GradientStatistics(mean_dot=mean_dot.numpy(), squared_norm=squared_norm.numpy())


def _metadata(data: bytes) -> dict:
    # A safetensors file starts with the 8-byte little-endian length of its JSON header.
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})


def _shorten(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
