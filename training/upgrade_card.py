"""Rewrite a schema-version-1 model.json as version 2, recording its validation split.

    python -m training.upgrade_card models/flowers-mobilevit-xxs \
        --data ../shared/datasets/flower_photos

Version 1 cards recorded only the seed and validation fraction of their recipe, and evaluation
remade the split from them over every listed file. This remakes it that one last time, the way
version 1 did, checks that it gives the number of validation photos the card records, and writes
it as split.json beside model.json (hashed in the card). Artifacts and their hashes are left
alone; `validation_top1` of each artifact becomes `top1`, with `evaluated_on` saying which
photos it was measured on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from contract.card import (
    CARD_FILE,
    SCHEMA_VERSION,
    SPLIT_FILE,
    ArtifactError,
    ModelCard,
    read_card,
    sha256_path,
    write_card,
)
from training.data import DataError, scan_folder, stratified_split


def first_recipe(training: dict) -> dict:
    """The recipe of the first run of the lineage: later runs (--init-from) inherit its split."""
    recipes = [training.get("recipe")] + [
        r.get("recipe") for r in training.get("initialised_from", [])
    ]
    recipe = next((r for r in reversed(recipes) if r and "seed" in r), None)
    if recipe is None:
        raise DataError("model.json records no training recipe, so its split cannot be remade")
    return recipe


def upgrade(model_dir: Path, data: Path) -> ModelCard:
    raw = json.loads((model_dir / CARD_FILE).read_text())
    if raw.get("schema_version") != 1:
        raise DataError(
            f"{model_dir / CARD_FILE} is schema_version {raw.get('schema_version')}, not 1"
        )
    recipe = first_recipe(raw.get("training") or {})
    paths, labels, class_names = scan_folder(data)
    if class_names != raw["labels"]:
        raise DataError(f"{data} has classes {class_names}, the model {raw['labels']}")
    train, val = stratified_split(np.asarray(labels), recipe["val_fraction"], recipe["seed"])
    expected = (raw.get("training") or {}).get("val_images")
    if expected is not None and len(val) != expected:
        raise DataError(f"remade split has {len(val)} validation photos, the card {expected}")
    split = {
        "root": str(data),
        "seed": recipe["seed"],
        "class_names": class_names,
        "train": [paths[i] for i in train],
        "val": [paths[i] for i in val],
    }
    (model_dir / SPLIT_FILE).write_text(json.dumps(split, indent=1) + "\n")
    for artifact in raw["artifacts"]:
        if "validation_top1" in artifact:
            artifact["top1"] = artifact.pop("validation_top1")
    raw.update(
        schema_version=SCHEMA_VERSION,
        split={
            "file": SPLIT_FILE,
            "sha256": sha256_path(model_dir / SPLIT_FILE),
            "data": str(data),
            "train_images": len(train),
            "validation_images": len(val),
        },
        evaluated_on={"photos": "validation_split", "data": str(data), "images": len(val)},
    )
    card = ModelCard.model_validate(raw)
    write_card(model_dir, card)
    return read_card(model_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.upgrade_card", description=__doc__.split("\n")[0]
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument("--data", type=Path, required=True, help="the photo folder it was trained on")
    args = p.parse_args(argv)
    try:
        card = upgrade(args.model_dir, args.data)
    except (DataError, ArtifactError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model_dir / CARD_FILE}: schema_version {card.schema_version}, "
          f"{card.split.validation_images} validation photos recorded in {SPLIT_FILE}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
