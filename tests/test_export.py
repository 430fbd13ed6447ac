"""The export command: artifacts, model.json contract, parity with Keras, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from contract.card import ArtifactError, load_model_card, read_card
from contract.preprocess import DEFAULT_PREPROCESSING, preprocess_file
from contract.runtime import SavedModelBackend, TFLiteBackend
from tests.conftest import REPO
from training.export import choose_default_tflite
from training.export import main as export_main


def _photos(photo_dir, size):
    files = sorted(photo_dir.rglob("*.jpg"))
    return files, np.stack([preprocess_file(str(f), size) for f in files])


def test_model_json_describes_everything_the_server_needs(tiny_model_dir):
    card = load_model_card(tiny_model_dir)  # verifies every hash
    assert card.labels == ["blue", "green", "red"]
    assert (card.input.height, card.input.width) == (64, 64)
    assert card.preprocessing == DEFAULT_PREPROCESSING
    assert card.evaluated_on.photos == "validation_split"
    assert card.split.validation_images == card.evaluated_on.images == 15
    assert card.variant == "xxs" and card.parameters > 0
    files = {a.file: a for a in card.artifacts}
    assert set(files) == {"saved_model", "model.tflite", "model_int8.tflite"}
    assert files["model_int8.tflite"].quantization == "int8"
    assert all(len(a.sha256) == 64 and a.bytes > 0 for a in card.artifacts)
    assert {"tensorflow", "keras", "python"} <= set(card.versions)
    assert card.training["train_images"] > 0 and card.metrics["validation_top1"] is not None
    # The speeds behind the default-artifact choice are recorded for every timed candidate.
    speed = card.metrics["artifacts"]["model.tflite"]["img_per_s_1_thread"]
    assert speed["batch_1"] > 0 and speed["batch_8"] > 0
    assert card.default_artifacts["tflite"] in files


def test_float_artifacts_match_keras_on_real_files(tiny_model_dir, tiny_keras_model, photo_dir):
    model = keras.models.load_model(tiny_keras_model)
    _, images = _photos(photo_dir, 64)
    expected = model.predict(images.astype(np.float32), verbose=0)
    tflite = TFLiteBackend(tiny_model_dir / "model.tflite", num_threads=2)
    assert tflite.input_shape[0] == -1  # dynamic batch axis
    for batch in (1, 5, len(images)):
        np.testing.assert_allclose(tflite.predict(images[:batch]), expected[:batch], atol=1e-4)
    saved = SavedModelBackend(tiny_model_dir / "saved_model")
    np.testing.assert_allclose(saved.predict(images), expected, atol=1e-4)


def test_int8_artifact_takes_uint8_pixels_and_agrees(tiny_model_dir, tiny_keras_model, photo_dir):
    model = keras.models.load_model(tiny_keras_model)
    _, images = _photos(photo_dir, 64)
    backend = TFLiteBackend(tiny_model_dir / "model_int8.tflite")
    assert backend.input_dtype == np.uint8
    probs = backend.predict(images)
    expected = model.predict(images.astype(np.float32), verbose=0)
    assert np.mean(probs.argmax(1) == expected.argmax(1)) >= 0.9
    assert not {op for op in backend.op_names() if op.startswith("Flex")}


def test_hash_mismatch_and_missing_files_are_named(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    with open(broken / "model.tflite", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match=r"model\.tflite does not match model\.json"):
        load_model_card(broken)
    shutil.copy(tiny_model_dir / "model.tflite", broken / "model.tflite")
    (broken / "model_int8.tflite").unlink()
    load_model_card(broken, verify=False)  # the card itself is fine
    with pytest.raises(ArtifactError, match=r"model_int8\.tflite is listed in model\.json but"):
        load_model_card(broken)
    card = json.loads((broken / "model.json").read_text())
    card["labels"] = ["only-one"]
    (broken / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="labels"):
        read_card(broken)
    with pytest.raises(ArtifactError, match="not a model directory"):
        read_card(tmp_path)


def test_export_refusals_leave_nothing_half_written(tiny_run, tiny_model_dir, tmp_path, capsys):
    assert export_main([str(tiny_run), "--out", str(tiny_model_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export_main([str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    assert "neither a run directory nor a .keras file" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert export_main([str(tmp_path / "notes.txt"), "--out", str(tmp_path / "m")]) == 2
    assert export_main([str(tiny_run), "--out", str(tmp_path / "m"), "--image-size", "100"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_export_at_another_size_keeps_the_weights(tiny_run, tmp_path, photo_dir):
    out = tmp_path / "at96"
    code = export_main([str(tiny_run), "--out", str(out), "--image-size", "96",
                        "--quantizations", "float32"])  # fmt: skip
    assert code == 0
    card = load_model_card(out)
    assert card.input.height == 96
    files, images = _photos(photo_dir, 96)
    probs = TFLiteBackend(out / "model.tflite").predict(images)
    truth = np.array([card.labels.index(f.parent.name) for f in files])
    assert np.mean(probs.argmax(1) == truth) > 0.6


def test_default_tflite_must_be_clearly_faster_alone_and_batched():
    f32, fp16, dyn = "model.tflite", "model_fp16.tflite", "model_dynamic.tflite"
    # fp16 wins alone but not batched: float32 stays the default.
    assert choose_default_tflite({f32: (100, 200), fp16: (130, 205)}, f32) == f32
    assert choose_default_tflite({f32: (100, 200), fp16: (111, 221)}, f32) == fp16
    # Of two that qualify, the faster batched one.
    speed = {f32: (100, 200), fp16: (150, 230), dyn: (120, 260)}
    assert choose_default_tflite(speed, f32) == dyn
    assert choose_default_tflite({f32: (100, 200)}, f32) == f32


def test_evaluate_scores_a_run_in_a_process_of_its_own(tiny_run, photo_dir, tmp_path):
    """`python -m training.evaluate RUN` as a user runs it: nothing has imported the model's
    layers before it loads final.keras (in this test session they are, which once hid it)."""
    command = [sys.executable, "-m", "training.evaluate", str(tiny_run), str(photo_dir),
               "--split", "validation", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    split = json.loads((tiny_run / "split.json").read_text())
    assert json.loads((tmp_path / "evaluation.json").read_text())["num_images"] == len(split["val"])


def test_a_run_stopped_before_its_end_exports_its_best_epoch(tiny_run, photo_dir, tmp_path):
    """best.keras is written each epoch that improves; report.json only with final.keras."""
    run = tmp_path / "stopped"
    shutil.copytree(tiny_run, run)
    (run / "final.keras").unlink()
    (run / "report.json").unlink()
    out = tmp_path / "model"
    assert export_main([str(run), "--out", str(out), "--quantizations", "float32",
                        "--calibration-images", "8"]) == 0  # fmt: skip
    card = read_card(out)
    assert card.labels == ["blue", "green", "red"]
    assert card.evaluated_on.photos == "validation_split"


def test_a_top1_measured_at_export_moves_the_reports_figures_aside():
    from training.export import measured_at_export

    table = {"top1": 0.9, "per_class": {"a": {"recall": 0.8}}}
    report = {"validation_top1": 0.9, "validation": table}
    assert measured_at_export(report, 0.9) == report  # the same figure: nothing moves
    assert measured_at_export(report, 0.900023) == {  # the report's, rounded: the table stays
        "validation_top1": 0.900023,
        "validation_top1_in_training_report": 0.9,
        "validation": table,
    }
    assert measured_at_export(report, 0.85) == {
        "validation_top1": 0.85,  # at the export size: the per-class table was not
        "validation_top1_in_training_report": 0.9,
        "validation_in_training_report": table,
    }
