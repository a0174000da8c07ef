"""`hf-moso score`: MoSo scores of every row of a dataset, from the output folder of a `MoSoTrainer` run."""

import argparse
import inspect
import json
import os
import shutil

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, DataCollatorWithPadding, PreTrainedModel, default_data_collator
from transformers.utils import logging

from .. import __version__
from ..config import MoSoConfig
from ..dataset import SCORE_COLUMN, add_moso_scores
from ..parameters import select_parameters
from ..scoring import PartialResults, PerLayerBackend, PerSampleGradientBackend
from ..scoring.partial_results import DEFAULT_CHUNK_ROWS
from ..snapshots import MANIFEST_NAME, read_manifest
from ..trainer import MoSoTrainer
from .data import build_rows, load_dataset_source, plan_rows
from .errors import InvalidInputError
from .outputs import check_output_free, publish_folder


logger = logging.get_logger(__name__)

SCORES_FILE = "scores.npy"
SCORES_INFO_FILE = "moso_scores.json"
SCORES_INFO_FORMAT_VERSION = 1
DEFAULT_BATCH_SIZE = 8

# Backends selectable with --backend, by the name each reports.
BACKENDS = {backend.name: backend for backend in (PerLayerBackend, PerSampleGradientBackend)}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a whole number of at least 1")
    return value


def add_parser(subparsers, **shared) -> None:
    parser = subparsers.add_parser(
        "score",
        **shared,
        help="score every row of a dataset with MoSo",
        description=(
            "Score every row of DATASET with MoSo, using the model and the weight snapshots that MoSoTrainer saved "
            "in MODEL_DIR. The result folder holds the dataset with a float64 moso_score column (load it with "
            f"datasets.load_from_disk), {SCORES_FILE} (the same scores as a NumPy array, in row order) and "
            f"{SCORES_INFO_FILE}. Finished pieces are saved in OUTPUT.partial while the command runs: run the same "
            "command again after a crash or a kill and it resumes from the last piece with identical scores. The "
            "result folder appears only when scoring is complete."
        ),
    )
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="folder of the trained model (trainer.save_model): config.json, safetensors weights, tokenizer files, "
        "and the snapshots in MODEL_DIR/moso",
    )
    parser.add_argument(
        "dataset",
        metavar="DATASET",
        help="a folder written by save_to_disk, a .parquet/.jsonl/.json/.csv/.tsv/.arrow file, a folder of such "
        "files, or a dataset id on the Hub",
    )

    parser.add_argument(
        "--output",
        metavar="DIR",
        help="result folder to create (default: MODEL_DIR/moso_scores); it must not exist unless --overwrite is given",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the result folder if it exists")

    parser.add_argument("--split", help="split to score (default: train, or the only split of a saved DatasetDict)")
    parser.add_argument("--config_name", help="configuration name of a Hub dataset (default: none)")
    parser.add_argument("--revision", help="revision (branch, tag or commit) of a Hub dataset (default: main)")
    parser.add_argument("--snapshot_dir", help="folder of the snapshots and manifest.json (default: MODEL_DIR/moso)")

    parser.add_argument("--label_column", help="column of the labels (default: 'label' or 'labels')")
    parser.add_argument(
        "--text_column",
        help="column of text to tokenize with the tokenizer of MODEL_DIR (default: the only text column, when "
        "the dataset holds no model input such as input_ids)",
    )
    parser.add_argument("--text_pair_column", help="second text column of sentence-pair tasks (default: none)")
    parser.add_argument(
        "--max_length",
        type=positive_int,
        help="truncate tokenized rows to this many tokens (default: the smaller of the tokenizer's model_max_length "
        "and the model's max_position_embeddings)",
    )

    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"rows per forward pass (default: {DEFAULT_BATCH_SIZE}); scores agree across batch sizes to float "
        "rounding, and a resumed run needs the batch size of the interrupted one",
    )
    parser.add_argument(
        "--chunk_rows",
        type=positive_int,
        default=DEFAULT_CHUNK_ROWS,
        help=f"rows per saved piece of a snapshot, rounded up to whole batches (default: {DEFAULT_CHUNK_ROWS}); a "
        "killed run computes again only the piece it was working on",
    )
    parser.add_argument(
        "--parameters",
        nargs="+",
        metavar="PATTERN",
        help="fnmatch patterns or presets on parameter names selecting the scored parameters (default: the "
        "`moso_parameters` of the training run, as its snapshot manifest records them, or else every parameter the "
        "optimizer updated during training)",
    )
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=PerLayerBackend.name,
        help=f"how per-row gradient statistics are computed: {PerLayerBackend.name} layer by layer, "
        f"{PerSampleGradientBackend.name} one row gradient at a time, slower (default: {PerLayerBackend.name})",
    )

    parser.add_argument("--use_cpu", action="store_true", help="score on the CPU even when a GPU is available")
    parser.set_defaults(run=run)


def load_model(model_dir: str):
    """Load the transformers model saved in `model_dir` with the class named in its config, from safetensors only."""
    if not os.path.isdir(model_dir):
        raise InvalidInputError(f"The model folder {model_dir} does not exist. Give the output folder of MoSoTrainer.")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise InvalidInputError(
            f"The model folder {model_dir} has no config.json. hf-moso score loads transformers models saved with "
            "`trainer.save_model()`; score other models from Python with `MoSoTrainer.compute_moso_scores`."
        )
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except ValueError as error:
        # transformers raises ValueError for a `model_type` it has no class for, such as a model defined in a script.
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as stream:
            model_type = json.load(stream).get("model_type")
        raise InvalidInputError(
            f"The config.json in {model_dir} has model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know. hf-moso score loads transformers architectures only; score "
            "models defined in your own code from Python with `MoSoTrainer.compute_moso_scores`."
        ) from error
    architectures = list(getattr(config, "architectures", None) or [])
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise InvalidInputError(
            f"The config.json in {model_dir} names the architecture {architectures or None}, which is not a class of "
            f"transformers {transformers.__version__}. Score custom models from Python with "
            "`MoSoTrainer.compute_moso_scores`."
        )
    try:
        return model_class.from_pretrained(model_dir, use_safetensors=True)
    except OSError as error:
        message = " ".join(str(error).split())
        raise InvalidInputError(
            f"Cannot load the model weights from {model_dir} ({message}). Save the model with `trainer.save_model()` "
            "(safetensors weights; pickled weights are not read)."
        ) from error


def load_tokenizer(model_dir: str):
    names = os.listdir(model_dir)
    if not any(name.startswith(("tokenizer", "vocab")) for name in names):
        return None
    return AutoTokenizer.from_pretrained(model_dir)


def check_model_computes_loss(model) -> None:
    parameters = inspect.signature(model.forward).parameters
    takes_kwargs = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())
    # transformers models that compute a loss name `labels` in `forward`; their `**kwargs` never carry it.
    if "labels" not in parameters and (not takes_kwargs or isinstance(model, PreTrainedModel)):
        raise InvalidInputError(
            f"The model class {type(model).__name__} takes no `labels`, so it returns no loss to score with. Save "
            "and score a model with a task head (for example AutoModelForSequenceClassification)."
        )


def select_trained_parameters(model, manifest, patterns) -> None:
    # A model loaded from disk has every parameter trainable; by default score those the optimizer updated.
    if patterns is None:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in manifest.parameter_groups)


def load_scoring_model(model_dir: str, snapshot_dir: str, patterns: list[str] | None):
    """Load the model, the snapshot manifest and the tokenizer, and check that they belong together."""
    try:
        manifest = read_manifest(snapshot_dir)
    except FileNotFoundError as error:
        raise InvalidInputError(
            f"No snapshot manifest at {os.path.join(snapshot_dir, MANIFEST_NAME)}. Give the output folder of a "
            "MoSoTrainer run, with its snapshots in <output_dir>/moso, or their folder with --snapshot_dir."
        ) from error
    model = load_model(model_dir)
    check_model_computes_loss(model)
    if manifest.model_class is not None and manifest.model_class != type(model).__name__:
        raise InvalidInputError(
            f"The snapshots in {snapshot_dir} were recorded from a {manifest.model_class}, but {model_dir} contains a "
            f"{type(model).__name__}. Give the model folder of the run that recorded the snapshots, or its snapshot "
            "folder with --snapshot_dir."
        )
    select_trained_parameters(model, manifest, patterns)
    return model, manifest, load_tokenizer(model_dir)


def load_rows(args):
    """Load the split to score and check that it can be scored."""
    dataset = load_dataset_source(args.dataset, args.split, args.config_name, args.revision)
    if len(dataset) < 2:
        raise InvalidInputError(
            f"The dataset {args.dataset} has {len(dataset)} row(s) in the chosen split; MoSo compares each row with "
            "the others, so it needs at least 2. Check the path and --split."
        )
    if SCORE_COLUMN in dataset.column_names:
        raise InvalidInputError(
            f"The dataset {args.dataset} already has a {SCORE_COLUMN!r} column. Score the dataset without it, for "
            f"example the one it was computed on, or drop the column with `remove_columns({SCORE_COLUMN!r})`."
        )
    return dataset


def write_result(staging: str, dataset, scores: np.ndarray, info: dict) -> None:
    """Write the scored dataset, `scores.npy` and the run description into the empty folder `staging`."""
    if os.path.lexists(staging):
        shutil.rmtree(staging)
    add_moso_scores(dataset, scores).save_to_disk(staging)
    np.save(os.path.join(staging, SCORES_FILE), scores)
    with open(os.path.join(staging, SCORES_INFO_FILE), "w", encoding="utf-8") as stream:
        json.dump(info, stream, indent=2)


def run(args) -> None:
    model_dir = args.model_dir
    output = args.output or os.path.join(model_dir, "moso_scores")
    partial_dir = f"{os.path.normpath(output)}.partial"
    snapshot_dir = args.snapshot_dir or os.path.join(model_dir, "moso")
    check_output_free(output, args.overwrite)

    # Model, snapshots and rows, all checked before anything is written.
    model, manifest, tokenizer = load_scoring_model(model_dir, snapshot_dir, args.parameters)
    if args.parameters is None and manifest.moso_parameters is not None:
        args.parameters = manifest.moso_parameters
        logger.info(f"Scoring the parameters the training run selected: moso_parameters={args.parameters}.")
    dataset = load_rows(args)
    plan = plan_rows(
        dataset,
        model,
        tokenizer,
        model_dir if tokenizer is not None else None,
        args.label_column,
        args.text_column,
        args.text_pair_column,
        args.max_length,
    )
    backend = BACKENDS[args.backend]()
    partial = PartialResults(
        partial_dir,
        plan.fingerprint,
        chunk_rows=args.chunk_rows,
        layout={"batch_size": args.batch_size, "dtype": str(model.dtype)},
    )
    parameter_names = select_parameters(model, args.parameters, manifest.parameter_groups).names
    partial.check(len(dataset), parameter_names, backend.name, type(model).__name__)

    # Scores, resumable through the partial results.
    os.makedirs(partial_dir, exist_ok=True)
    rows = build_rows(dataset, plan, tokenizer, cache_file=os.path.join(partial_dir, "tokenized.arrow"))
    config = MoSoConfig(
        output_dir=partial_dir,
        moso_snapshot_dir=snapshot_dir,
        moso_parameters=args.parameters,
        moso_batch_size=args.batch_size,
        use_cpu=args.use_cpu,
        report_to="none",
        save_strategy="no",
        disable_tqdm=args.no_progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available() and not args.use_cpu,
    )
    trainer = MoSoTrainer(
        model=model,
        args=config,
        data_collator=DataCollatorWithPadding(tokenizer) if tokenizer is not None else default_data_collator,
        processing_class=tokenizer,
        scoring_backend=backend,
    )
    scores = trainer.compute_moso_scores(rows, partial_results=partial)

    # The result folder, moved into place whole; the partial results go once it is there.
    info = {
        "format_version": SCORES_INFO_FORMAT_VERSION,
        "hf_moso_version": __version__,
        "dataset": args.dataset,
        "split": args.split or (str(dataset.split) if dataset.split is not None else None),
        "config_name": args.config_name,
        "revision": args.revision,
        "num_rows": len(dataset),
        "dataset_fingerprint": dataset._fingerprint,
        "label_column": plan.label_column,
        "model_dir": os.path.abspath(model_dir),
        "model_class": type(model).__name__,
        "snapshot_dir": os.path.abspath(snapshot_dir),
        "snapshots": [
            {"step": snapshot.step, "sha256": snapshot.sha256, "learning_rates": snapshot.learning_rates}
            for snapshot in manifest.snapshots
        ],
        "parameters": args.parameters,
        "backend": args.backend,
        "batch_size": args.batch_size,
    }
    staging = os.path.join(partial_dir, "result")
    write_result(staging, dataset, scores, info)
    publish_folder(staging, output, args.overwrite)
    shutil.rmtree(partial_dir)
    logger.info(f"Wrote the MoSo scores of {len(dataset)} rows to {output}.")
