"""Helpers shared by the benchmark scripts: the accuracy metric, results files that survive interruption, the machine."""

import json
import os
import platform
import subprocess
import sys
import time

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(BENCHMARKS)
SHARED_DATA = os.path.join(REPOSITORY, "..", "shared", "data")
LOCAL_ACCURACY = os.path.join(BENCHMARKS, "metrics", "accuracy")


def load_accuracy_metric():
    """Return `evaluate`'s accuracy metric from the Hub, or the local copy in `metrics/accuracy` when offline."""
    import evaluate

    try:
        metric = evaluate.load("accuracy")
        source = "Hub"
    except Exception as error:  # evaluate raises several error types offline (ConnectionError, FileNotFoundError...)
        logger.warning(f"evaluate.load('accuracy') failed ({type(error).__name__}); using {LOCAL_ACCURACY}.")
        metric = evaluate.load(LOCAL_ACCURACY)
        source = "local metric module benchmarks/metrics/accuracy"
    return metric, source


def read_results(path: str) -> list[dict]:
    """Read the JSON lines written so far; a truncated last line (from an interrupted write) is skipped."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning(f"Skipping an unreadable line of {path}: {line[:80]!r}")
    return rows


def append_result(path: str, row: dict) -> None:
    """Append one finished run as a JSON line and flush it to disk at once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(row, sort_keys=True) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def describe_machine() -> str:
    """Describe the machine in one line: CPU model, core count, memory, accelerator and library versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as stream:
            total_kib = int(stream.readline().split()[1])
        memory = f", {total_kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    import datasets
    import transformers

    accelerator = "CUDA GPU" if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} CPU cores{memory}, {accelerator}; Python {sys.version.split()[0]}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}; "
        f"torch threads {torch.get_num_threads()}"
    )


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "-C", REPOSITORY, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")
