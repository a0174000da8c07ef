"""
Publish a scored and pruned dataset twice to the Hub at `HF_ENDPOINT`, then load it back with `load_dataset`.

Run by `tests/test_publishing.py` in a subprocess, because huggingface_hub and datasets read `HF_ENDPOINT`,
`HF_HUB_OFFLINE` and `HF_HUB_DISABLE_XET` when they are imported.

    python publish_to_hub.py WORKDIR

WORKDIR holds `pruned/` and `scored/` (`save_to_disk`), `snapshots/` (a snapshot folder) and `settings.json`. The
script writes under WORKDIR/out: `first_default/`, `first_scored/` and `second_default/` (what `load_dataset`
returned after each push) and `urls.json` (the card commit URLs).

The first push publishes the pruned rows, every scored row as configuration `scored` and the card, with the
license read from the source dataset's card on the Hub. The second push replaces column `input_ids` with
`num_words` in both configurations, so the card's listed features must follow the data.
"""

import json
import logging
import os
import sys

from datasets import load_dataset, load_from_disk

from hf_moso import create_dataset_card, push_pruned_dataset, read_manifest, source_dataset_license


def with_word_counts(dataset):
    """Replace `input_ids` with the number of words of `text`."""
    return dataset.map(lambda row: {"num_words": len(row["text"].split())}).remove_columns("input_ids")


def build_card(pruned, scored, settings, license):
    return create_dataset_card(
        pruned,
        scored,
        read_manifest(os.path.join(workdir, "snapshots")),
        source_dataset=settings["source_dataset"],
        source_revision=settings["source_revision"],
        model_name=settings["model_name"],
        keep=settings["keep"],
        class_balanced=settings["class_balanced"],
        label_column=settings["label_column"],
        license=license,
    )


if __name__ == "__main__":
    workdir = sys.argv[1]
    output = os.path.join(workdir, "out")
    os.makedirs(output, exist_ok=True)
    # Every logger at debug level, so that the test can check that no log line contains the token.
    logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    with open(os.path.join(workdir, "settings.json")) as stream:
        settings = json.load(stream)
    repo_id = settings["repo_id"]
    pruned = load_from_disk(os.path.join(workdir, "pruned"))
    scored = load_from_disk(os.path.join(workdir, "scored"))

    license = source_dataset_license(settings["source_dataset"], revision=settings["source_revision"])
    urls = {}
    card = build_card(pruned, scored, settings, license)
    urls["first"] = push_pruned_dataset(repo_id, pruned, card, scored_dataset=scored, token=os.environ["HF_TOKEN"])
    load_dataset(repo_id, split="train").save_to_disk(os.path.join(output, "first_default"))
    load_dataset(repo_id, "scored", split="train").save_to_disk(os.path.join(output, "first_scored"))

    pruned, scored = with_word_counts(pruned), with_word_counts(scored)
    card = build_card(pruned, scored, settings, license)
    urls["second"] = push_pruned_dataset(repo_id, pruned, card, scored_dataset=scored)
    load_dataset(repo_id, split="train").save_to_disk(os.path.join(output, "second_default"))

    with open(os.path.join(output, "urls.json"), "w") as stream:
        json.dump(urls, stream)
