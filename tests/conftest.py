import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Real SST-2, TREC and MNIST files; tests that need them skip when the folder is absent.
SHARED_DATA = os.environ.get(
    "HF_MOSO_DATA_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
)


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Keep every Hub and datasets cache inside the test's temporary folder."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
