import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from conftest import SHARED_DATA
from hf_moso import (
    MoSoConfig,
    MoSoTrainer,
    add_moso_scores,
    create_dataset_card,
    prune_dataset,
    read_manifest,
    select_rows,
)
from hf_moso.card import HISTOGRAM_PATH
from hub_stub import HubStub, StoredFile, git_blob_oid, yaml_block_error
from models import cpu_config, pad_collator, tiny_bert, token_dataset


TREC_TRAIN = os.path.join(SHARED_DATA, "trec", "TREC.train.all")
TREC_CLASSES = ["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DUMMY_TOKEN = "hf_stubTokenThatMustNeverBeLogged"
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")


def score_bytes(dataset: Dataset) -> bytes:
    """The raw float64 bytes of the score column, so that comparisons are bit-exact."""
    return np.asarray(dataset.with_format(None)["moso_score"], dtype=np.float64).tobytes()


def assert_same_rows(actual: Dataset, expected: Dataset):
    assert actual.features == expected.features
    assert len(actual) == len(expected)
    assert actual.with_format(None)[:] == expected.with_format(None)[:]
    assert score_bytes(actual) == score_bytes(expected)


def card_metadata(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match is not None, "the card has no YAML block"
    return yaml.safe_load(match.group(1))


# Scores on datasets with an indices mapping and on DatasetDict splits.


def identified_rows(num_rows: int = 40) -> Dataset:
    features = Features(
        {"row_id": Value("int64"), "label": ClassLabel(names=["a", "b", "c"]), "note": Value("string")}
    )
    rows = {
        "row_id": list(range(num_rows)),
        "label": [index % 3 for index in range(num_rows)],
        "note": [f"n{index}" for index in range(num_rows)],
    }
    return Dataset.from_dict(rows, features=features)


def score_of(row_id: int) -> float:
    # Distinct, non-round float64 values, so that a score on the wrong row or a rounding shows.
    return (row_id + 1) / 7.0 - 3.0


@pytest.mark.parametrize(
    "view, has_mapping",
    [
        # A contiguous `select` slices the table instead of adding an indices mapping.
        (lambda data: data.select(range(17)), False),
        (lambda data: data.select([3, 1, 30, 2]), True),
        (lambda data: data.shuffle(seed=0), True),
        (lambda data: data.select(range(25)).shuffle(seed=0), True),
        (lambda data: data.filter(lambda row: row["row_id"] % 4 != 1), True),
        (lambda data: data.shuffle(seed=3).select([5, 0, 12, 7]), True),
    ],
    ids=["select-range", "select-list", "shuffle", "select-shuffle", "filter", "shuffle-select"],
)
def test_scores_land_on_their_rows(view, has_mapping):
    dataset = view(identified_rows())
    assert (dataset._indices is not None) == has_mapping
    row_ids = dataset.with_format(None)["row_id"][:]
    scores = np.array([score_of(row_id) for row_id in row_ids])

    scored = add_moso_scores(dataset, scores)

    assert scored.with_format(None)["row_id"][:] == row_ids
    for row in scored:
        assert row["moso_score"] == score_of(row["row_id"])
    assert scored.features["moso_score"] == Value("float64")
    for name, feature in dataset.features.items():
        assert scored.features[name] == feature


def test_scores_select_then_shuffle_round_trip(tmp_path):
    dataset = identified_rows().select(range(30)).shuffle(seed=0)
    scores = np.array([score_of(row_id) for row_id in dataset["row_id"]])
    scored = add_moso_scores(dataset, scores)
    scored.save_to_disk(str(tmp_path / "scored"))

    reloaded = load_from_disk(str(tmp_path / "scored"))

    assert_same_rows(reloaded, scored)
    assert [score_of(row_id) for row_id in reloaded["row_id"]] == reloaded["moso_score"][:]


def test_float32_scores_widen_exactly():
    dataset = identified_rows(5)
    scores = np.array([0.1, -2.5, 1e-7, 3.3, 7.0], dtype=np.float32)
    scored = add_moso_scores(dataset, scores)
    assert score_bytes(scored) == scores.astype(np.float64).tobytes()


def test_dataset_dict_other_splits_untouched():
    train, test = identified_rows(12), identified_rows(5)
    splits = DatasetDict({"train": train, "test": test})
    scores = np.linspace(-1.0, 1.0, 12)

    scored = add_moso_scores(splits, scores, split="train")
    pruned = prune_dataset(splits, scores, keep=0.5, split="train")

    assert list(scored) == ["train", "test"]
    assert scored["test"] is test
    assert scored["train"]["moso_score"][:] == scores.tolist()
    assert pruned["test"] is test
    assert pruned["train"]["row_id"][:] == list(range(6, 12))
    assert splits["train"] is train
    assert "moso_score" not in train.column_names


def test_dataset_dict_split_errors():
    splits = DatasetDict({"train": identified_rows(4), "test": identified_rows(2)})
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]; pass `split=`"):
        add_moso_scores(splits, np.zeros(4))
    with pytest.raises(ValueError, match="Split 'validation' not found"):
        add_moso_scores(splits, np.zeros(4), split="validation")
    with pytest.raises(ValueError, match="4 rows"):
        add_moso_scores(splits, np.zeros(2), split="train")
    with pytest.raises(TypeError, match="datasets.Dataset or datasets.DatasetDict"):
        add_moso_scores({"train": [1, 2]}, np.zeros(2))
    one_split = DatasetDict({"train": identified_rows(3)})
    assert add_moso_scores(one_split, np.zeros(3))["train"].column_names[-1] == "moso_score"


# Threshold pruning and pruning by an existing score column.


def test_threshold_keeps_scores_at_or_above():
    scores = np.array([0.2, -1.0, 0.5, 0.2, 3.0, -0.1])
    assert select_rows(scores, threshold=0.2).tolist() == [0, 2, 3, 4]
    assert select_rows(scores, threshold=3.0).tolist() == [4]
    with pytest.raises(ValueError, match="highest score is 3.0"):
        select_rows(scores, threshold=3.5)
    with pytest.raises(ValueError, match="exactly one of `keep`"):
        select_rows(scores, keep=2, threshold=0.0)
    with pytest.raises(ValueError, match="exactly one of `keep`"):
        select_rows(scores)
    with pytest.raises(TypeError, match="number"):
        select_rows(scores, threshold="0.2")
    with pytest.raises(ValueError, match="finite"):
        select_rows(scores, threshold=float("nan"))


def test_threshold_class_balanced_keeps_count():
    scores = np.array([0.9, 0.8, 0.7, 0.6, -0.5, -0.6])
    labels = np.array([0, 0, 0, 0, 1, 1])
    # Four rows reach 0.0; class-balanced, class 1 keeps its share (one row) although it scores below 0.0.
    kept = select_rows(scores, labels=labels, class_balanced=True, threshold=0.0)
    assert kept.tolist() == [0, 1, 2, 4]


def test_prune_by_existing_score_column():
    dataset = identified_rows(9)
    scores = np.array([score_of(i) * (-1) ** i for i in range(9)])
    scored = add_moso_scores(dataset, scores)

    by_column = prune_dataset(scored, threshold=0.0)
    by_array = prune_dataset(dataset, scores, threshold=0.0)

    assert_same_rows(by_column, by_array)
    assert all(score >= 0.0 for score in by_column["moso_score"])
    with pytest.raises(ValueError, match="no 'moso_score' column"):
        prune_dataset(dataset, keep=3)
    with pytest.raises(ValueError, match="already has a column 'moso_score'"):
        prune_dataset(scored, scores, keep=3)


def test_prune_warns_on_ignored_label_column(caplog):
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            prune_dataset(identified_rows(6), np.arange(6.0), keep=3, label_column="label")
    finally:
        logging.disable_propagation()
    assert "`label_column`='label' is ignored" in caplog.text


# A real run: TREC questions scored by a small bag-of-words classifier.


class BagOfWords(nn.Module):
    """Mean of word embeddings followed by a linear layer; returns a loss like transformers classifiers."""

    def __init__(self, vocab_size: int, num_labels: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(vocab_size, 12)
        self.head = nn.Linear(12, num_labels)

    def forward(self, input_ids, attention_mask, labels=None):
        mask = attention_mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.head(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_trec_rows(rows_per_class: int) -> tuple[Dataset, int]:
    """
    Return a fixed random sample of TREC training questions and the vocabulary size of their word ids.

    The sample has `rows_per_class` rows of each class plus the line with the non-UTF-8 byte, decoded as U+FFFD.
    """
    with open(TREC_TRAIN, "rb") as stream:
        lines = stream.read().splitlines()
    invalid = [index for index, line in enumerate(lines) if not is_utf8(line)]
    assert len(invalid) == 1, "TREC.train.all should contain exactly one line that is not valid UTF-8"
    line_labels = np.array([int(line.split(b" ", 1)[0]) for line in lines])
    generator = np.random.default_rng(0)
    chosen = list(invalid)
    for label in range(len(TREC_CLASSES)):
        members = np.setdiff1d(np.flatnonzero(line_labels == label), invalid)
        chosen.extend(generator.choice(members, rows_per_class, replace=False).tolist())
    chosen.sort()

    texts, labels = [], []
    for index in chosen:
        label, text = lines[index].decode("utf-8", errors="replace").split(" ", 1)
        texts.append(text)
        labels.append(int(label))
    words = sorted({word for text in texts for word in text.lower().split()})
    vocabulary = {word: position + 1 for position, word in enumerate(words)}
    input_ids = [[vocabulary[word] for word in text.lower().split()][:24] for text in texts]
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=TREC_CLASSES), "input_ids": [Value("int64")]}
    )
    dataset = Dataset.from_dict({"text": texts, "label": labels, "input_ids": input_ids}, features=features)
    return dataset, len(vocabulary) + 1


@pytest.fixture(scope="module")
def trec_run(tmp_path_factory):
    """Train, score and prune 301 TREC questions; return the datasets, the snapshot folder and the settings."""
    if not os.path.isfile(TREC_TRAIN):
        pytest.skip(f"TREC data not found at {TREC_TRAIN}; set HF_MOSO_DATA_DIR to the shared data folder.")
    folder = tmp_path_factory.mktemp("trec_run")
    train, vocab_size = read_trec_rows(rows_per_class=50)
    args = cpu_config(
        folder / "out",
        per_device_train_batch_size=32,
        num_train_epochs=2,
        learning_rate=0.05,
        moso_num_snapshots=3,
        moso_batch_size=60,
    )
    trainer = MoSoTrainer(
        model=BagOfWords(vocab_size, len(TREC_CLASSES)), args=args, train_dataset=train, data_collator=pad_collator
    )
    # One backward pass per row on a tiny model is dominated by thread start-up: one intra-op thread is ~10x
    # faster than two on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.train()
        scored = trainer.score_dataset()
    finally:
        torch.set_num_threads(threads)
    settings = {"keep": 0.6, "class_balanced": True, "label_column": "label"}
    pruned = prune_dataset(scored, keep=settings["keep"], class_balanced=True, label_column="label")
    return {
        "train": train,
        "scored": scored,
        "pruned": pruned,
        "snapshots": args.moso_snapshot_folder,
        "args": args,
        "settings": settings,
    }


def test_trec_scores_are_real(trec_run):
    scored = trec_run["scored"]
    scores = np.asarray(scored["moso_score"])
    assert np.isfinite(scores).all()
    # TREC repeats some questions; identical rows get identical scores, distinct rows distinct ones.
    distinct_rows = {(row["text"], row["label"]) for row in scored}
    assert np.unique(scores).size == len(distinct_rows)
    assert trec_run["scored"].features["text"] == Value("string")
    assert sum("\ufffd" in text for text in trec_run["scored"]["text"]) == 1
    assert len(read_manifest(trec_run["snapshots"]).snapshots) == 3


def test_trec_disk_and_parquet_round_trips(trec_run, tmp_path):
    for name in ("scored", "pruned"):
        dataset = trec_run[name]
        dataset.save_to_disk(str(tmp_path / f"{name}_disk"))
        assert_same_rows(load_from_disk(str(tmp_path / f"{name}_disk")), dataset)

        dataset.to_parquet(str(tmp_path / f"{name}.parquet"))
        loaded = load_dataset("parquet", data_files=str(tmp_path / f"{name}.parquet"), split="train")
        assert_same_rows(loaded, dataset)


def trec_card(trec_run, **overrides):
    settings = trec_run["settings"]
    arguments = dict(
        source_dataset="questions/trec-sample",
        source_revision="d61ded09c99c0199d8c5bca946cd65864de2b296",
        model_name="bag-of-words",
        keep=settings["keep"],
        class_balanced=settings["class_balanced"],
        label_column=settings["label_column"],
        license="cc-by-4.0",
        training_arguments=trec_run["args"],
    )
    arguments.update(overrides)
    manifest = read_manifest(trec_run["snapshots"])
    return create_dataset_card(trec_run["pruned"], trec_run["scored"], manifest, **arguments)


def test_card_metadata_and_histogram(trec_run, tmp_path):
    card = trec_card(trec_run)
    card.save(tmp_path / "pruned" / "README.md")

    text = (tmp_path / "pruned" / "README.md").read_text()
    metadata = card_metadata(text)
    assert yaml_block_error(text) is None
    assert DatasetCard(text).data.to_dict() == metadata
    assert metadata["license"] == "cc-by-4.0"
    assert metadata["tags"][:2] == ["moso", "data-pruning"]
    assert metadata["task_categories"] == ["text-classification"]
    assert metadata["source_datasets"] == ["questions/trec-sample"]
    assert metadata["size_categories"] == ["n<1K"]

    image = tmp_path / "pruned" / HISTOGRAM_PATH
    assert image.read_bytes().startswith(PNG_SIGNATURE)
    assert image.read_bytes() == card.images[HISTOGRAM_PATH]
    assert f"]({HISTOGRAM_PATH})" in text


def test_card_renders_histogram_and_table(trec_run):
    markdown_it = pytest.importorskip("markdown_it")
    card = trec_card(trec_run)

    html = markdown_it.MarkdownIt("commonmark").enable("table").render(card.text)

    images = re.findall(r'<img src="([^"]+)"', html)
    assert images == [HISTOGRAM_PATH]
    tables = re.findall(r"<table>.*?</table>", html, re.DOTALL)
    class_tables = [table for table in tables if "<th>rows before</th>" in table]
    assert len(class_tables) == 1
    for name in TREC_CLASSES:
        assert f"<td>{name}</td>" in class_tables[0]


def test_card_body_states_run(trec_run):
    card = trec_card(trec_run)
    text = card.text
    scored, pruned = trec_run["scored"], trec_run["pruned"]
    manifest = read_manifest(trec_run["snapshots"])

    assert "d61ded09c99c0199d8c5bca946cd65864de2b296" in text
    assert f"| Rows before | {len(scored)} |" in text
    assert f"| Rows after | {len(pruned)} |" in text
    assert f"keep={trec_run['settings']['keep']!r}" in text
    for snapshot in manifest.snapshots:
        rates = ", ".join(repr(rate) for rate in snapshot.learning_rates)
        assert f"| {snapshot.step} | {rates} |" in text
    assert f"moso_snapshot_steps={manifest.planned_steps!r}" in text
    assert "learning_rate=0.05" in text
    assert "Data Pruning via Moving-one-Sample-out" in text
    assert "Tan, Haoru" in text
    assert "Advances in Neural Information Processing Systems" in text

    before = np.bincount(scored["label"], minlength=len(TREC_CLASSES))
    after = np.bincount(pruned["label"], minlength=len(TREC_CLASSES))
    for index, name in enumerate(TREC_CLASSES):
        assert f"| {name} | {before[index]} | {after[index]} |" in text
    for name in pruned.column_names:
        assert f"| `{name}` |" in text


def test_card_rejects_inconsistent_settings(trec_run):
    with pytest.raises(ValueError, match=r"keeps 120"):
        trec_card(trec_run, keep=0.4)
    with pytest.raises(ValueError, match="exactly one of `keep`"):
        trec_card(trec_run, keep=None)
    with pytest.raises(ValueError, match="not a subset"):
        create_dataset_card(
            add_moso_scores(trec_run["train"], np.zeros(len(trec_run["train"]))),
            trec_run["scored"],
            read_manifest(trec_run["snapshots"]),
            source_dataset="x",
            model_name="y",
            keep=1.0,
        )


def test_card_threshold_selection(trec_run):
    scored = trec_run["scored"]
    threshold = float(np.median(scored["moso_score"]))
    pruned = prune_dataset(scored, threshold=threshold)
    card = create_dataset_card(
        pruned, scored, read_manifest(trec_run["snapshots"]), source_dataset="x", model_name="y", threshold=threshold
    )
    assert f"threshold={threshold!r}" in card.text
    assert "prune_dataset(scored, threshold=" in card.text
    assert "license" not in card_metadata(str(card))


# Publishing to a stub Hub on 127.0.0.1.


@pytest.fixture
def stub_hub(tmp_path):
    with HubStub(tmp_path / "hub_storage", token=DUMMY_TOKEN) as hub:
        yield hub


def add_source_repository(hub: HubStub, repo_id: str, license: str):
    repository = hub.create_repository("dataset", repo_id, private=False)
    readme = f"---\nlicense: {license}\n---\n# Source\n".encode()
    files = dict(repository.commits[repository.branches["main"]].files)
    files["README.md"] = StoredFile(hub.store_object(readme), len(readme), False, git_blob_oid(readme))
    return hub.add_commit(repository, "main", "add card", files)


def test_publish_to_stub_hub(trec_run, stub_hub, tmp_path):
    source = add_source_repository(stub_hub, "stub-user/source-questions", "cc-by-4.0")
    workdir = tmp_path / "work"
    trec_run["pruned"].save_to_disk(str(workdir / "pruned"))
    trec_run["scored"].save_to_disk(str(workdir / "scored"))
    os.symlink(trec_run["snapshots"], workdir / "snapshots")
    settings = dict(
        trec_run["settings"],
        repo_id="stub-user/trec-moso",
        source_dataset="stub-user/source-questions",
        source_revision=source.oid,
        model_name="bag-of-words",
    )
    (workdir / "settings.json").write_text(json.dumps(settings))

    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    environment.update(
        HF_ENDPOINT=stub_hub.endpoint,
        HF_TOKEN=DUMMY_TOKEN,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_OFFLINE="0",
        HF_DATASETS_OFFLINE="0",
        HF_HOME=str(tmp_path / "client_home"),
        HF_HUB_VERBOSITY="debug",
        DATASETS_VERBOSITY="debug",
        NO_PROXY="127.0.0.1",
    )
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "publish_to_hub.py"), str(workdir)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert DUMMY_TOKEN not in result.stdout + result.stderr
    assert "Pushing" in result.stderr  # the library's own log lines were captured, at debug level

    # What load_dataset(repo_id) returned after the first push: the same rows and bit-identical scores.
    output = workdir / "out"
    assert_same_rows(load_from_disk(str(output / "first_default")), trec_run["pruned"])
    assert_same_rows(load_from_disk(str(output / "first_scored")), trec_run["scored"])

    # After the second push, with `num_words` in place of `input_ids`.
    second = load_from_disk(str(output / "second_default"))
    assert second.column_names == ["text", "label", "moso_score", "num_words"]
    assert second["text"] == trec_run["pruned"]["text"][:]
    assert score_bytes(second) == score_bytes(trec_run["pruned"])

    # The card in the repository lists the features of the data of each configuration.
    repository = stub_hub.repository("dataset", "stub-user/trec-moso")
    head = repository.commits[repository.branches["main"]]
    readme = stub_hub.read_object(head.files["README.md"].sha256).decode()
    metadata = card_metadata(readme)
    infos = DatasetInfosDict.from_dataset_card_data(DatasetCard(readme).data)
    assert set(infos) == {"default", "scored"}
    for config_name in ("default", "scored"):
        assert infos[config_name].features == second.features
    assert {entry["config_name"] for entry in metadata["configs"]} == {"default", "scored"}
    assert metadata["license"] == "cc-by-4.0"
    assert "moso" in metadata["tags"]
    assert "| `num_words` |" in readme
    assert "input_ids" not in readme

    # The histogram travels with the repository, at the path the card links to.
    assert f"]({HISTOGRAM_PATH})" in readme
    image = stub_hub.read_object(head.files[HISTOGRAM_PATH].sha256)
    assert image.startswith(PNG_SIGNATURE)

    # The second push replaced the data files: one shard per configuration is left.
    data_files = sorted(path for path in head.files if path.endswith(".parquet"))
    assert len(data_files) == 2
    assert any(method == "POST" and path == "/api/validate-yaml" for method, path, _ in stub_hub.requests)


def test_publish_checks_arguments(trec_run):
    from hf_moso import push_pruned_dataset

    card = trec_card(trec_run)
    with pytest.raises(ValueError, match="no `scored_dataset` was given"):
        push_pruned_dataset("stub-user/x", trec_run["pruned"], card)
    no_scored = trec_card(trec_run, scored_config=None)
    with pytest.raises(ValueError, match="scored_config=None"):
        push_pruned_dataset("stub-user/x", trec_run["pruned"], no_scored, scored_dataset=trec_run["scored"])
    with pytest.raises(TypeError, match="MoSoDatasetCard"):
        push_pruned_dataset("stub-user/x", trec_run["pruned"], DatasetCard(str(card)))
    with pytest.raises(ValueError, match="no 'moso_score' column"):
        push_pruned_dataset("stub-user/x", trec_run["train"], no_scored)


# The Trainer's model card.


def test_trainer_model_card_has_moso_tag(tmp_path):
    args = MoSoConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        moso_num_snapshots=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = MoSoTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8), data_collator=pad_collator)
    trainer.train()

    trainer.create_model_card(model_name="tiny-moso", tags="text-classification")

    metadata = card_metadata((tmp_path / "out" / "README.md").read_text())
    assert "moso" in metadata["tags"]
    assert "text-classification" in metadata["tags"]
    assert metadata["tags"].count("moso") == 1
