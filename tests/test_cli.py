"""The `hf-moso` command driven from a shell: each subcommand, and each invalid input with its exit code."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Value, load_from_disk
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel, DataCollatorWithPadding

from hf_moso import MoSoConfig, MoSoTrainer
from hf_moso.snapshots import file_sha256, read_manifest, write_manifest
from hub_stub import HubStub, StoredFile, git_blob_oid
from trained_run import run_cli, train_run


DUMMY_TOKEN = "hf_cli_test_token"
QUIET = ["--no_progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_run(str(tmp_path_factory.mktemp("cli")), num_rows=24, num_snapshots=3)


@pytest.fixture(scope="module")
def scored(run):
    output = os.path.join(os.path.dirname(run["model_dir"]), "scores")
    result = run_cli("score", run["model_dir"], run["dataset_dir"], "--output", output, "--batch_size", "5", *QUIET)
    assert result.returncode == 0, result.stderr
    return {"output": output, "result": result}


@pytest.fixture(scope="module")
def pruned(scored):
    output = os.path.join(os.path.dirname(scored["output"]), "pruned")
    result = run_cli("prune", scored["output"], "--keep", "0.5", "--class_balanced", "--output", output, *QUIET)
    assert result.returncode == 0, result.stderr
    return output


def files_of(folder) -> dict:
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


def error_line(result) -> str:
    """The last stderr line, checked to be the command's one-line error with no traceback before it."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("hf-moso: error: "), result.stderr[-2000:]
    assert sum(line.startswith("hf-moso: error:") for line in lines) == 1
    return lines[-1]


# Successful runs.


def test_score_writes_result_folder(run, scored):
    output = scored["output"]
    scores = np.load(os.path.join(output, "scores.npy"))
    dataset = load_from_disk(output)
    original = load_from_disk(run["dataset_dir"])

    assert scores.dtype == np.float64
    assert scores.shape == (24,)
    assert np.isfinite(scores).all()
    assert dataset.column_names == original.column_names + ["moso_score"]
    assert dataset.features["moso_score"] == Value("float64")
    assert dataset["moso_score"][:] == scores.tolist()
    assert dataset["text"][:] == original["text"][:]
    assert not os.path.exists(output + ".partial")
    info = json.loads(open(os.path.join(output, "moso_scores.json")).read())
    assert [entry["step"] for entry in info["snapshots"]] == [
        s.step for s in read_manifest(run["model_dir"] + "/moso").snapshots
    ]
    assert "Wrote the MoSo scores of 24 rows" in scored["result"].stderr


def test_score_matches_trainer_in_process(run, scored):
    tokenizer = AutoTokenizer.from_pretrained(run["model_dir"])
    model = BertForSequenceClassification.from_pretrained(run["model_dir"])
    rows = load_from_disk(run["dataset_dir"]).map(lambda batch: tokenizer(batch["text"]), batched=True)
    args = MoSoConfig(
        output_dir=os.path.join(os.path.dirname(run["model_dir"]), "in_process"),
        moso_snapshot_dir=os.path.join(run["model_dir"], "moso"),
        moso_batch_size=5,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = MoSoTrainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer))

    expected = trainer.compute_moso_scores(rows)

    # float32 forward passes in two processes agree to rounding, as the engine tests allow against brute force.
    np.testing.assert_allclose(np.load(os.path.join(scored["output"], "scores.npy")), expected, rtol=1e-5, atol=0)


def test_score_defaults_to_run_parameters(tmp_path):
    run = train_run(str(tmp_path), num_rows=12, num_snapshots=2, moso_parameters=["classifier.*"])
    outputs = {name: str(tmp_path / name) for name in ("default", "head", "all")}

    default = run_cli("score", run["model_dir"], run["dataset_dir"], "--output", outputs["default"], *QUIET)
    head = run_cli(
        "score", run["model_dir"], run["dataset_dir"], "--output", outputs["head"], "--parameters", "classifier.*",
        *QUIET,
    )  # fmt: skip
    every = run_cli(
        "score", run["model_dir"], run["dataset_dir"], "--output", outputs["all"], "--parameters", "*", *QUIET
    )

    for result in (default, head, every):
        assert result.returncode == 0, result.stderr[-3000:]
    scores = {name: np.load(os.path.join(folder, "scores.npy")) for name, folder in outputs.items()}
    info = json.loads(open(os.path.join(outputs["default"], "moso_scores.json")).read())
    assert info["parameters"] == ["classifier.*"]
    assert "moso_parameters=['classifier.*']" in default.stderr
    np.testing.assert_array_equal(scores["default"], scores["head"])
    assert not np.allclose(scores["default"], scores["all"])


def test_score_existing_output_rejected(run, scored):
    before = files_of(scored["output"])

    result = run_cli("score", run["model_dir"], run["dataset_dir"], "--output", scored["output"], *QUIET)

    assert result.returncode == 3
    assert "already exists" in error_line(result)
    assert "--overwrite" in error_line(result)
    assert files_of(scored["output"]) == before


def test_prune_keeps_class_balanced_rows(scored, pruned):
    kept = load_from_disk(pruned)
    everything = load_from_disk(scored["output"])

    assert len(kept) == 12
    assert sorted(set(kept["label"][:])) == sorted(set(everything["label"][:]))
    assert kept.column_names == everything.column_names
    assert json.loads(open(os.path.join(pruned, "moso_prune.json")).read())["keep"] == 0.5


def test_card_written_beside_pruned_rows(pruned):
    result = run_cli("card", pruned, "--license", "mit", "--model_name", "tiny-bert", *QUIET)

    assert result.returncode == 0, result.stderr
    card = open(os.path.join(pruned, "README.md")).read()
    assert "license: mit" in card
    assert "tiny-bert" in card
    assert "keeps 12 of the 24 rows" in card
    assert os.path.isfile(os.path.join(pruned, "images", "moso_score_histogram.png"))


def test_push_to_stub_hub(pruned, tmp_path):
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    with HubStub(tmp_path / "hub_storage", token=DUMMY_TOKEN) as hub:
        environment.update(
            HF_ENDPOINT=hub.endpoint,
            HF_TOKEN=DUMMY_TOKEN,
            HF_HUB_DISABLE_XET="1",
            HF_HOME=str(tmp_path / "client_home"),
            NO_PROXY="127.0.0.1",
        )
        result = run_cli("push", pruned, "stub-user/pruned-rows", "--model_name", "tiny-bert", *QUIET, env=environment)

        assert result.returncode == 0, result.stderr[-3000:]
        assert DUMMY_TOKEN not in result.stdout + result.stderr
        repository = hub.repository("dataset", "stub-user/pruned-rows")
        files = repository.commits[repository.branches["main"]].files
        assert "README.md" in files
        assert "images/moso_score_histogram.png" in files
        default = [path for path in files if path.startswith("data/") and path.endswith(".parquet")]
        scored_files = [path for path in files if path.startswith("scored/") and path.endswith(".parquet")]
        assert default and scored_files
        table = pq.read_table(pa.BufferReader(hub.read_object(files[default[0]].sha256)))
        assert table.num_rows == 12


def add_dataset_repository(hub: HubStub, repo_id: str, dataset) -> None:
    repository = hub.create_repository("dataset", repo_id, private=False)
    buffer = pa.BufferOutputStream()
    pq.write_table(dataset.with_format("arrow")[:], buffer)
    data = buffer.getvalue().to_pybytes()
    files = dict(repository.commits[repository.branches["main"]].files)
    stored = StoredFile(hub.store_object(data), len(data), True, git_blob_oid(data))
    files["data/validation-00000-of-00001.parquet"] = stored
    hub.add_commit(repository, "main", "add rows", files)


def test_score_hub_dataset(run, scored, tmp_path):
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    with HubStub(tmp_path / "hub_storage", token=DUMMY_TOKEN) as hub:
        add_dataset_repository(hub, "stub-user/texts", load_from_disk(run["dataset_dir"]))
        environment.update(
            HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "home"), NO_PROXY="127.0.0.1"
        )
        output = str(tmp_path / "scores")
        arguments = ["--split", "validation", "--batch_size", "5", "--output", output, *QUIET]

        result = run_cli("score", run["model_dir"], "stub-user/texts", *arguments, env=environment)

    assert result.returncode == 0, result.stderr[-3000:]
    scores = np.load(os.path.join(output, "scores.npy"))
    np.testing.assert_allclose(scores, np.load(os.path.join(scored["output"], "scores.npy")), rtol=1e-6, atol=0)
    assert json.loads(open(os.path.join(output, "moso_scores.json")).read())["split"] == "validation"


# Invalid input: exit code 3, a one-line message, and the earlier result folder left as it was.


def _copy_run(run, tmp_path) -> str:
    model_dir = str(tmp_path / "run_copy")
    shutil.copytree(run["model_dir"], model_dir, ignore=shutil.ignore_patterns("moso_scores*"))
    return model_dir


def _rewrite_snapshot(model_dir: str, index: int, change) -> int:
    folder = os.path.join(model_dir, "moso")
    manifest = read_manifest(folder)
    snapshot = manifest.snapshots[index]
    path = os.path.join(folder, snapshot.file)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    snapshot.sha256 = file_sha256(path)
    write_manifest(folder, manifest)
    return snapshot.step


def case_no_labels(run, tmp_path):
    load_from_disk(run["dataset_dir"]).remove_columns("label").to_json(str(tmp_path / "data.jsonl"))
    return [run["model_dir"], str(tmp_path / "data.jsonl")], ["no labels", "--label_column"]


def case_labels_out_of_range(run, tmp_path):
    data = load_from_disk(run["dataset_dir"]).cast_column("label", Value("int64"))
    labels = data["label"][:]
    labels[5] = 7
    data.remove_columns("label").add_column("label", labels).to_parquet(str(tmp_path / "data.parquet"))
    return [run["model_dir"], str(tmp_path / "data.parquet")], ["row 5 has 7", "num_labels=3"]


def case_empty_dataset(run, tmp_path):
    load_from_disk(run["dataset_dir"]).select([]).save_to_disk(str(tmp_path / "data"))
    return [run["model_dir"], str(tmp_path / "data")], ["has 0 rows", "at least 2"]


def case_non_finite_loss(run, tmp_path):
    model_dir = _copy_run(run, tmp_path)
    token = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("awful")

    def poison(tensors):
        tensors["bert.embeddings.word_embeddings.weight"][token] = float("nan")

    _rewrite_snapshot(model_dir, 1, poison)
    texts = load_from_disk(run["dataset_dir"])["text"][:]
    rows = [index for index, text in enumerate(texts) if "awful" in text.split()]
    assert rows, "the test dataset must contain the poisoned word"
    # The first pass stops at the first batch (of 5 rows) with a non-finite loss and names its rows.
    named = ", ".join(str(row) for row in rows if row // 5 == rows[0] // 5)
    return [model_dir, run["dataset_dir"]], [f"The loss of row(s) {named} is not finite"]


def case_missing_snapshot(run, tmp_path):
    model_dir = _copy_run(run, tmp_path)
    snapshot = read_manifest(os.path.join(model_dir, "moso")).snapshots[1]
    os.remove(os.path.join(model_dir, "moso", snapshot.file))
    return [model_dir, run["dataset_dir"]], [f"snapshot of step {snapshot.step} is missing"]


def case_corrupt_snapshot(run, tmp_path):
    model_dir = _copy_run(run, tmp_path)
    snapshot = read_manifest(os.path.join(model_dir, "moso")).snapshots[2]
    path = os.path.join(model_dir, "moso", snapshot.file)
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    return [model_dir, run["dataset_dir"]], ["does not match its checksum", f"step {snapshot.step}"]


def case_model_without_loss(run, tmp_path):
    model_dir = str(tmp_path / "encoder")
    config = BertForSequenceClassification.from_pretrained(run["model_dir"]).config
    BertModel(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(run["model_dir"]).save_pretrained(model_dir)
    shutil.copytree(os.path.join(run["model_dir"], "moso"), os.path.join(model_dir, "moso"))
    return [model_dir, run["dataset_dir"]], ["BertModel takes no `labels`", "task head"]


def case_model_not_matching_snapshots(run, tmp_path):
    model_dir = str(tmp_path / "smaller")
    config = BertConfig.from_pretrained(run["model_dir"])
    config.hidden_size, config.intermediate_size = 8, 16
    BertForSequenceClassification(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(run["model_dir"]).save_pretrained(model_dir)
    snapshots = os.path.join(run["model_dir"], "moso")
    return [model_dir, run["dataset_dir"], "--snapshot_dir", snapshots], ["does not match the model", "shape differs"]


def case_snapshot_folder_missing(run, tmp_path):
    missing = str(tmp_path / "no_snapshots")
    return [run["model_dir"], run["dataset_dir"], "--snapshot_dir", missing], [
        "No snapshot manifest",
        "--snapshot_dir",
    ]


def case_model_type_unknown(run, tmp_path):
    model_dir = _copy_run(run, tmp_path)
    path = os.path.join(model_dir, "config.json")
    with open(path, encoding="utf-8") as stream:
        config = json.load(stream)
    config["model_type"] = "custom_cnn"
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(config, stream)
    return [model_dir, run["dataset_dir"]], ["model_type 'custom_cnn'", "MoSoTrainer.compute_moso_scores"]


@pytest.mark.parametrize(
    "case",
    [
        case_no_labels,
        case_labels_out_of_range,
        case_empty_dataset,
        case_non_finite_loss,
        case_missing_snapshot,
        case_corrupt_snapshot,
        case_model_without_loss,
        case_model_not_matching_snapshots,
        case_model_type_unknown,
        case_snapshot_folder_missing,
    ],
)
def test_score_invalid_input(run, scored, tmp_path, case):
    arguments, expected = case(run, tmp_path)
    earlier = str(tmp_path / "earlier")
    shutil.copytree(scored["output"], earlier)
    before = files_of(earlier)

    result = run_cli("score", *arguments, "--output", earlier, "--overwrite", "--batch_size", "5", *QUIET)

    assert result.returncode == 3, result.stderr[-3000:]
    message = error_line(result)
    for fragment in expected:
        assert fragment in message
    assert files_of(earlier) == before


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--keep", "abc"], ["Invalid --keep value 'abc'", "0.7"]),
        (["--keep", "1.5"], ["`keep`=1.5 is out of range", "(0, 1]"]),
        (["--keep", "2", "--class_balanced"], ["leaves no row of class(es)", "allow_empty_classes"]),
        (
            ["--keep", "0.5", "--class_balanced", "--label_column", "labell"],
            ["Label column 'labell' not found", "with --label_column."],
        ),
    ],
)
def test_prune_invalid_input(scored, pruned, tmp_path, arguments, expected):
    earlier = str(tmp_path / "earlier")
    shutil.copytree(pruned, earlier)
    before = files_of(earlier)

    result = run_cli("prune", scored["output"], *arguments, "--output", earlier, "--overwrite", *QUIET)

    assert result.returncode == 3, result.stderr[-3000:]
    message = error_line(result)
    for fragment in expected:
        assert fragment in message
    assert files_of(earlier) == before


def test_prune_allow_empty_classes_warns(scored, tmp_path):
    output = str(tmp_path / "two_rows")

    result = run_cli(
        "prune", scored["output"], "--keep", "2", "--class_balanced", "--allow_empty_classes", "--output", output
    )

    assert result.returncode == 0, result.stderr
    assert "leaves no row of class(es)" in result.stderr
    assert "WARNING" in result.stderr
    assert len(load_from_disk(output)) == 2


def test_usage_error_and_help(tmp_path):
    unknown = run_cli("score", "model", "data", "--batch_size", "0")
    assert unknown.returncode == 2
    assert "--batch_size: invalid value '0'" in unknown.stderr

    help_text = run_cli("score", "--help").stdout
    assert "(default: 8)" in help_text
    assert "rows per forward pass" in help_text
    assert "3    invalid input" in help_text
