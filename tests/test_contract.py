"""The shared model contract: package boundaries, the card the server enforces, the recorded
split, export from every documented input, and photos kept small in memory."""

from __future__ import annotations

import ast
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.main import create_app
from contract.card import ArtifactError, load_model_card, read_card
from contract.preprocess import PreprocessingSpec, load_bounded, resize_for_model
from tests.conftest import TINY_SIZE, write_photo_folder
from tests.serving_helpers import REPO, make_settings, running, serve

pytestmark = pytest.mark.anyio


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of `package` imports (anywhere in the module)."""
    found = {}
    for path in sorted((REPO / package).glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[path.name] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("training", {"app"}),
        ("app", {"training", "keras"}),
        ("contract", {"app", "training", "fastapi", "starlette", "keras"}),
    ],
)
def test_packages_import_only_downward(package, forbidden):
    offenders = {name: sorted(imports & forbidden) for name, imports in
                 imported_packages(package).items() if imports & forbidden}  # fmt: skip
    assert not offenders, f"{package}/ imports {offenders}"


def test_the_contract_imports_no_tensorflow_at_import_time():
    for path in (REPO / "contract").glob("*.py"):
        name, source = path.name, path.read_text()
        top_level = {
            n.module or "" for n in ast.parse(source).body if isinstance(n, ast.ImportFrom)
        }
        top_level |= {a.name for n in ast.parse(source).body if isinstance(n, ast.Import)
                      for a in n.names}  # fmt: skip
        assert not {m for m in top_level if m.startswith("tensorflow")}, name


def test_training_uses_no_private_keras_attributes():
    pattern = re.compile(r"(?<!self)(?<!cls)\.(_[a-z]\w*)")
    for path in (REPO / "training").glob("*.py"):
        private = [m.group(1) for m in pattern.finditer(path.read_text())]
        assert not private, f"{path.name} reaches into {private}"


# ---- the card the server enforces ------------------------------------------------------------


def edited_copy(model_dir: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    card = json.loads((copy / "model.json").read_text())
    edit(card)
    (copy / "model.json").write_text(json.dumps(card))
    return copy


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda c: c["preprocessing"].update(interpolation="lanczos"),
         "preprocessing.interpolation"),
        (lambda c: c["preprocessing"].update(resize="squash"), "preprocessing.resize"),
        (lambda c: c["preprocessing"].update(mean=[0.5, 0.5, 0.5]), "preprocessing.mean"),
        (lambda c: c["input"].update(color="BGR"), "input.color"),
        (lambda c: c.update(schema_version=1), "schema_version 1"),
        (lambda c: c["input"].update(value_range=[0, 1]), "input.value_range"),
        (lambda c: c["artifacts"][0].update(file="/etc/passwd"), "artifacts.0.file"),
        (lambda c: c["artifacts"][0].update(file="../model.tflite"), "artifacts.0.file"),
        (lambda c: c["default_artifacts"].update(tflite="saved_model"),
         "default artifact 'saved_model' for tflite is a savedmodel file"),
    ],
)  # fmt: skip
async def test_startup_refuses_a_card_it_cannot_apply(tiny_model_dir, tmp_path, edit, needle):
    settings = make_settings(edited_copy(tiny_model_dir, tmp_path, edit))
    app = create_app(settings)
    with pytest.raises(RuntimeError, match=re.escape(needle)):
        async with running(app):
            pass
    assert app.state.service is None


async def test_a_tflite_only_deployment_starts(tiny_model_dir, tmp_path):
    slim = tmp_path / "slim"
    shutil.copytree(tiny_model_dir, slim)
    shutil.rmtree(slim / "saved_model")
    (slim / "model_int8.tflite").unlink()
    (slim / "split.json").unlink()
    async with serve(make_settings(slim)) as served:
        info = (await served.client.get("/model-info")).json()
        present = {a["file"]: a["present"] for a in info["artifacts"]}
        assert present == {"saved_model": False, "model.tflite": True, "model_int8.tflite": False}
        assert info["served"]["artifact"] == "model.tflite"
    with pytest.raises(ArtifactError, match=r"saved_model is listed in model\.json but missing"):
        load_model_card(slim)  # the full check (export, evaluate) still names what is gone


def test_crop_fraction_keeps_the_centre():
    pixels = np.zeros((100, 100, 3), np.uint8)
    pixels[25:75, 25:75] = 255  # a white centre half on black
    image = Image.fromarray(pixels)
    assert resize_for_model(image, 20).mean() < 200  # whole frame: black border in view
    half = resize_for_model(image, 20, PreprocessingSpec(crop_fraction=0.5))
    assert half[2:-2, 2:-2].min() > 200  # only the white centre


# ---- training data ---------------------------------------------------------------------------


def test_large_photos_are_kept_at_a_bound_tied_to_the_training_size():
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (90, 140, 60)).save(buffer, "JPEG")
    image = load_bounded(buffer.getvalue(), 256)
    assert min(image.size) == 256 and image.size[0] == round(256 * 4 / 3)
    small = Image.new("RGB", (120, 90))
    small_buffer = io.BytesIO()
    small.save(small_buffer, "PNG")
    assert load_bounded(small_buffer.getvalue(), 256).size == (120, 90)  # never upscaled


def test_stray_files_do_not_move_photos_between_training_and_validation(tmp_path):
    """The split training made over decodable photos is the one evaluation scores."""
    from training.evaluate import main as evaluate_main
    from training.train import main as train_main

    data = write_photo_folder(tmp_path / "data", per_class=8)
    (data / "blue" / "0-notes.txt").write_text("not a photo")
    (data / "green" / "Thumbs.db").write_bytes(b"\0" * 64)
    run = tmp_path / "run"
    assert train_main(["--data", str(data), "--run-dir", str(run), "--image-size", "64",
                       "--epochs", "1", "--batch-size", "8", "--run-eagerly",
                       "--val-fraction", "0.25"]) == 0  # fmt: skip
    split = json.loads((run / "split.json").read_text())
    assert not any(p.endswith((".txt", ".db")) for p in split["train"] + split["val"])
    out = tmp_path / "eval"
    assert evaluate_main([str(run), str(data), "--split", "validation", "--out", str(out)]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    assert result["num_images"] == len(split["val"]) == 6


# ---- export from every documented input ------------------------------------------------------


def test_export_of_a_bare_keras_file_with_data_says_what_it_scored(
    tiny_keras_model, photo_dir, tmp_path
):
    from training.export import main as export_main

    bare = tmp_path / "bare.keras"
    shutil.copy(tiny_keras_model, bare)  # no split.json or report.json beside it
    data = tmp_path / "data"
    shutil.copytree(photo_dir, data)
    (data / "red" / "notes.txt").write_text("stray")
    out = tmp_path / "exported"
    args = ["--quantizations", "float32", "--calibration-images", "8"]
    assert export_main([str(bare), "--data", str(data), "--out", str(out), *args]) == 0
    card = load_model_card(out)
    assert card.labels == ["blue", "green", "red"]
    assert card.evaluated_on.photos == "all_photos" and card.evaluated_on.images == 60
    assert card.split is None and "validation_top1" not in card.metrics
    assert next(a for a in card.artifacts if a.file == "model.tflite").top1 > 0.6


def test_export_refuses_folders_that_are_not_the_model_labels(
    tiny_keras_model, photo_dir, tmp_path, capsys
):
    from training.export import main as export_main

    bare = tmp_path / "bare.keras"
    shutil.copy(tiny_keras_model, bare)
    assert export_main([str(bare), "--out", str(tmp_path / "m")]) == 2
    assert "no recorded split" in capsys.readouterr().err
    data = tmp_path / "four"
    shutil.copytree(photo_dir, data)
    shutil.copytree(photo_dir / "red", data / "violet")
    assert export_main([str(bare), "--data", str(data), "--out", str(tmp_path / "m")]) == 2
    assert "4 class folders" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_export_records_the_run_split_and_evaluate_uses_it(tiny_run, tiny_model_dir, photo_dir,
                                                           tmp_path):  # fmt: skip
    from training.evaluate import main as evaluate_main

    card = read_card(tiny_model_dir)
    recorded = json.loads((tiny_model_dir / "split.json").read_text())
    assert recorded == json.loads((tiny_run / "split.json").read_text())
    assert card.split.validation_images == len(recorded["val"])
    out = tmp_path / "eval"
    assert evaluate_main([str(tiny_model_dir), str(photo_dir), "--format", "tflite",
                          "--split", "validation", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "evaluation.json").read_text())
    tflite = next(a for a in card.artifacts if a.file == "model.tflite")
    assert result["num_images"] == len(recorded["val"])
    assert result["top1"] == pytest.approx(tflite.top1, abs=1e-9)
    # An altered split is refused, naming the file.
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_model_dir, tampered)
    (tampered / "split.json").write_text(json.dumps({**recorded, "val": recorded["val"][:3]}))
    assert evaluate_main([str(tampered), str(photo_dir), "--split", "validation",
                          "--out", str(out)]) == 2  # fmt: skip


def test_a_version_1_card_is_upgraded_with_its_remade_split(tiny_run, tiny_model_dir, photo_dir,
                                                            tmp_path):  # fmt: skip
    from training.upgrade_card import main as upgrade_main

    def to_version_1(card):
        card.update(schema_version=1)
        card.pop("split"), card.pop("evaluated_on")
        for artifact in card["artifacts"]:
            artifact["validation_top1"] = artifact.pop("top1")
        card["training"]["val_images"] = 15

    old = edited_copy(tiny_model_dir, tmp_path, to_version_1)
    (old / "split.json").unlink()
    assert upgrade_main([str(old), "--data", str(photo_dir)]) == 0
    card = load_model_card(old)
    assert card.schema_version == 2 and card.evaluated_on.photos == "validation_split"
    upgraded = json.loads((old / "split.json").read_text())
    run_split = json.loads((tiny_run / "split.json").read_text())
    assert sorted(upgraded["val"]) == sorted(run_split["val"])
    assert card.input.height == TINY_SIZE
