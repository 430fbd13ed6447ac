"""Data pipeline, the training command line end to end, evaluation and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import COLOURS, TINY_SIZE, write_photo_folder
from training.data import (
    Augment,
    DataError,
    PhotoBatches,
    load_folder,
    scan_folder,
    stratified_split,
)
from training.report import classification_metrics


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat([0, 1, 2], [40, 25, 10])
    train, val = stratified_split(labels, 0.2, seed=7)
    again_train, again_val = stratified_split(labels, 0.2, seed=7)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(labels)
    assert [int(np.sum(labels[val] == c)) for c in range(3)] == [8, 5, 2]


def test_corrupt_files_are_skipped_with_a_warning(tmp_path, caplog):
    write_photo_folder(tmp_path, per_class=2)
    (tmp_path / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "red" / "notes.txt").write_text("hello")
    dataset = load_folder(tmp_path)
    assert len(dataset.images) == 6
    assert "broken.jpg" in caplog.text and "notes.txt" in caplog.text


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "not found"),
        ({"only": 2}, "at least two class"),
        ({"a": 2, "b": 0}, "is empty"),
    ],
)
def test_bad_folders_stop_with_clear_messages(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout:
        for name, count in layout.items():
            (root / name).mkdir(parents=True)
            for i in range(count):
                (root / name / f"{i}.png").write_bytes(b"")
    with pytest.raises(DataError, match=message):
        scan_folder(root)


def test_class_without_readable_images_is_refused(tmp_path):
    write_photo_folder(tmp_path, per_class=2)
    for path in (tmp_path / "blue").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable image"):
        load_folder(tmp_path)


def test_batches_are_augmented_float_pixels_with_one_hot_labels(photo_dir):
    dataset = load_folder(photo_dir)
    batches = PhotoBatches(dataset, 8, Augment(48), seed=0)
    x, y = batches[0]
    assert x.shape == (8, 48, 48, 3) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 255
    assert y.shape == (8, len(COLOURS))
    np.testing.assert_array_equal(y.sum(axis=1), 1)
    first = batches[0][0]
    batches.on_epoch_end()
    assert not np.array_equal(first, batches[0][0])  # reshuffled, new crops


def test_each_process_of_a_multi_process_run_gets_its_share_of_the_same_batches(photo_dir):
    dataset = load_folder(photo_dir)
    whole = PhotoBatches(dataset, 8, Augment(32), seed=4, epoch=2)
    shares = [PhotoBatches(dataset, 8, Augment(32), seed=4, epoch=2, shard=(k, 2)) for k in (0, 1)]
    assert len(whole) == len(shares[0]) == len(shares[1]) == 60 // 8
    ids = whole._order[3 * 8 : 4 * 8]  # batch 3
    for k, share in enumerate(shares):
        x, y = share[3]
        assert len(x) == 4
        np.testing.assert_array_equal(y.argmax(axis=1), dataset.labels[ids[k::2]])


def test_multi_scale_batches_take_each_size_in_turn(photo_dir):
    dataset = load_folder(photo_dir)
    batches = PhotoBatches(dataset, 8, Augment(32), seed=0, sizes=(32, 64, 96))
    assert [batches[i][0].shape[1:3] for i in range(4)] == [(32, 32), (64, 64), (96, 96), (32, 32)]
    batches.on_epoch_end()  # the next epoch starts one size on, so every size leads in turn
    assert [batches[i][0].shape[1] for i in range(3)] == [64, 96, 32]


def test_a_multi_scale_run_trains_one_model_on_every_size(photo_dir, tmp_path):
    """Graph mode (no --run-eagerly): TensorFlow then traces the step for maps of unknown size,
    which the fixed-size model never meets. final.keras is at --image-size, as without it."""
    import keras

    from training.train import main

    run = tmp_path / "multi"
    assert main(["--data", str(photo_dir), "--run-dir", str(run), "--image-size", "64",
                 "--multi-scale", "64,96", "--epochs", "1", "--batch-size", "8",
                 "--limit-per-class", "8", "--no-ema", "--no-jit-compile"]) == 0  # fmt: skip
    assert keras.models.load_model(run / "last.keras").input_shape == (None, None, None, 3)
    assert keras.models.load_model(run / "final.keras").input_shape == (None, 64, 64, 3)
    report = json.loads((run / "report.json").read_text())
    assert report["recipe"]["multi_scale"] == [64, 96]
    with pytest.raises(SystemExit):  # argparse: sizes must be multiples of 32
        main(["--data", str(photo_dir), "--run-dir", str(tmp_path), "--multi-scale", "64,100"])
    one_batch = ["--data", str(photo_dir), "--run-dir", str(tmp_path / "one"), "--image-size", "64",
                 "--multi-scale", "64,96", "--batch-size", "16",
                 "--limit-per-class", "6"]  # fmt: skip
    assert main(one_batch) == 2  # a single batch an epoch cannot alternate sizes


def test_metrics_per_class_and_confusion():
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b"])
    assert m["top1"] == 0.75
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}


def test_training_run_beats_chance_and_writes_its_report(tiny_run):
    """The fast end-to-end test: a tiny MobileViT learns two+ visibly different classes."""
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["validation"]["top1"] > 0.6  # chance is 1/3
    for name in ("final.keras", "best.keras", "last.keras", "log.csv", "split.json", "curves.png",
                 "confusion.png", "config.json"):  # fmt: skip
        assert (tiny_run / name).is_file(), name
    split = json.loads((tiny_run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    assert report["parameters"] > 0 and report["train_images_per_s"] > 0


def test_evaluate_command_on_a_labelled_folder(tiny_run, photo_dir, tmp_path, capsys):
    from training.evaluate import main

    out = tmp_path / "eval"
    assert main([str(tiny_run), str(photo_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "confusion matrix" in printed
    result = json.loads((out / "evaluation.json").read_text())
    assert result["num_images"] == 60 and (out / "confusion.png").is_file()
    # Only the photos of the run's validation split: the figure the training report gave.
    assert main([str(tiny_run), str(photo_dir), "--out", str(out), "--split", "validation"]) == 0
    split = json.loads((tiny_run / "split.json").read_text())
    result = json.loads((out / "evaluation.json").read_text())
    assert result["num_images"] == len(split["val"]) == 15
    report = json.loads((tiny_run / "report.json").read_text())
    assert result["top1"] == pytest.approx(report["validation"]["top1"], abs=1e-3)
    # A .keras file of the run: its labels and split are those of the run it is in.
    keras_file = [str(tiny_run / "final.keras"), str(photo_dir), "--out", str(out)]
    assert main([*keras_file, "--split", "validation"]) == 0
    assert json.loads((out / "evaluation.json").read_text())["top1"] == result["top1"]


def test_resume_continues_where_the_run_stopped(photo_dir, tmp_path):
    from training.train import main

    run = tmp_path / "run"
    common = ["--run-dir", str(run)]
    # EMA stays on (the default): resuming must restore the optimizer's moving averages too.
    args = ["--data", str(photo_dir), "--image-size", "64", "--epochs", "1", "--batch-size", "16",
            "--limit-per-class", "8", "--run-eagerly"]  # fmt: skip
    assert main(common + args) == 0
    # A finished run refuses to be overwritten and resumes as a no-op at the same epoch.
    assert main(common + args) == 2
    # As if the run had been planned longer and was killed while saving its next checkpoint
    # (last.keras is written through a partial file): re-plan to 2 epochs and resume.
    (run / "last.partial.keras").write_bytes(b"cut off")
    assert main([*common, "--resume", "--epochs", "2"]) == 0
    assert not (run / "last.partial.keras").exists()
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1"]  # epoch 2 appended, not redone
    assert main([*common, "--resume"]) == 0  # finished: nothing more to train
    assert len((run / "log.csv").read_text().strip().splitlines()) == 3


def test_init_from_fine_tunes_another_run_at_another_size(tiny_run, photo_dir, tmp_path):
    """Same split as the source run, and training starts from its weights."""
    import keras

    from training.export import earlier_runs
    from training.train import main

    tuned = tmp_path / "tuned"
    source = tiny_run / "final.keras"
    size = TINY_SIZE + 32
    assert main(["--data", str(photo_dir), "--run-dir", str(tuned), "--image-size", str(size),
                 "--epochs", "1", "--batch-size", "16", "--lr", "1e-9", "--no-ema",
                 "--run-eagerly", "--init-from", str(source)]) == 0  # fmt: skip
    split, tuned_split = (json.loads((d / "split.json").read_text()) for d in (tiny_run, tuned))
    assert (tuned_split["train"], tuned_split["val"]) == (split["train"], split["val"])
    before, after = (keras.models.load_model(f) for f in (source, tuned / "final.keras"))
    assert after.input_shape[1] == size
    kernel = next(i for i, w in enumerate(before.weights) if "kernel" in w.path)
    np.testing.assert_allclose(after.weights[kernel].numpy(), before.weights[kernel].numpy(),
                               atol=1e-6)  # fmt: skip
    report = json.loads((tuned / "report.json").read_text())
    assert report["recipe"]["init_from"] == str(source)
    assert [(r["epochs"], r["image_size"]) for r in earlier_runs(report)] == [(10, TINY_SIZE)]
    # A checkpoint that cannot be loaded is a CLI error, not a traceback.
    missing = ["--data", str(photo_dir), "--run-dir", str(tmp_path / "bad"), "--image-size",
               str(size), "--init-from", str(tiny_run / "missing.keras")]  # fmt: skip
    assert main(missing) == 2


def test_missing_data_folder_is_a_clear_cli_error(tmp_path, capsys):
    from training.train import main

    assert main(["--data", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_init_from_an_exported_model_directory(tiny_model_dir, tiny_run, photo_dir, tmp_path):
    """A model directory's SavedModel seeds training (no .keras file needed) with the split its
    recipe made, so the shipped model can be trained further in any later session."""
    import keras

    from training.export import earlier_runs
    from training.train import main

    tuned = tmp_path / "tuned"
    assert main(["--data", str(photo_dir), "--run-dir", str(tuned), "--image-size",
                 str(TINY_SIZE), "--epochs", "1", "--batch-size", "16", "--lr", "1e-9",
                 "--no-ema", "--run-eagerly", "--init-from", str(tiny_model_dir)]) == 0  # fmt: skip
    split, tuned_split = (json.loads((d / "split.json").read_text()) for d in (tiny_run, tuned))
    assert (tuned_split["train"], tuned_split["val"]) == (split["train"], split["val"])
    before, after = (keras.models.load_model(d / "final.keras") for d in (tiny_run, tuned))
    for name in ("stem_conv", "probs"):
        np.testing.assert_allclose(after.get_layer(name).get_weights()[0],
                                   before.get_layer(name).get_weights()[0], atol=1e-6)  # fmt: skip
    card = json.loads((tiny_model_dir / "model.json").read_text())
    lineage = earlier_runs(json.loads((tuned / "report.json").read_text()))
    assert lineage[0]["model"] == f"tiny-mobilevit {card['version']}"
    assert (lineage[0]["epochs"], lineage[0]["image_size"]) == (10, TINY_SIZE)
    # Photos of other classes than the model's labels: a CLI error, not a traceback.
    two_classes = tmp_path / "two"
    for label in ("blue", "red"):
        shutil.copytree(photo_dir / label, two_classes / label)
    assert main(["--data", str(two_classes), "--run-dir", str(tmp_path / "bad"), "--image-size",
                 str(TINY_SIZE), "--init-from", str(tiny_model_dir)]) == 2  # fmt: skip


def test_trivial_augment_ops_keep_the_image_size():
    from PIL import Image

    from training.data import TRIVIAL_OPS

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8))
    for name, (op, top, _) in TRIVIAL_OPS.items():
        out = op(image, top * 0.5)
        assert out.size == image.size and out.mode == "RGB", name


def test_random_erasing_replaces_one_box():
    from training.data import random_erase

    rng = np.random.default_rng(0)
    pixels = np.zeros((64, 64, 3), np.uint8)
    erased = random_erase(pixels, rng, p=1.0)
    changed = np.argwhere(erased.any(axis=2))
    assert len(changed) > 0 and not pixels.any()  # a copy: the source is untouched
    rows, cols = changed[:, 0], changed[:, 1]
    assert erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].any(axis=2).mean() > 0.9
    assert random_erase(pixels, rng, p=0.0) is pixels


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixed_batches_keep_soft_labels_in_proportion(mixup, cutmix):
    from training.data import MixBatch

    rng = np.random.default_rng(3)
    x = np.stack([np.full((16, 16, 3), 10.0 * i, np.float32) for i in range(8)])
    y = np.eye(8, dtype=np.float32)
    mixed_x, mixed_y = MixBatch(mixup, cutmix)(x, y, rng)
    np.testing.assert_allclose(mixed_y.sum(axis=1), 1.0, atol=1e-6)
    # Each photo's share of its own label is the share of its own pixel value it kept.
    for i in range(8):
        own = mixed_y[i, i]
        assert 0.0 <= own <= 1.0
        if own < 1.0:
            other = int(np.argmax(np.where(np.arange(8) == i, -1, mixed_y[i])))
            expected = own * 10.0 * i + (1 - own) * 10.0 * other
            assert mixed_x[i].mean() == pytest.approx(expected, abs=1e-3)
    assert MixBatch()(x, y, rng)[0] is x


def test_resolution_scores_the_final_weights_at_each_test_size(tiny_run, capsys):
    from training.resolution import main

    report = json.loads((tiny_run / "report.json").read_text())
    assert main([str(tiny_run), "--sizes", f"{TINY_SIZE},{TINY_SIZE + 32}"]) == 0
    printed = capsys.readouterr().out
    assert "best:" in printed and "--image-size" in printed
    result = json.loads((tiny_run / "resolution.json").read_text())
    trained, larger = result["sizes"]
    # At its own size the model is scored as the training report scored it.
    assert trained["top1"] == pytest.approx(report["validation"]["top1"], abs=1e-6)
    assert trained["images"] == larger["images"] == report["val_images"]
    assert larger["relative_pixels"] > 1 and 0 <= larger["top1"] <= 1
    assert result["best"] in result["sizes"]


def test_epochs_within_a_time_budget_never_undo_epochs():
    from training.train import epochs_within

    assert epochs_within(100.0, done=2, epoch_s=10.0) == 2 + 10
    assert epochs_within(5.0, done=2, epoch_s=10.0) == 2
    assert epochs_within(-30.0, done=7, epoch_s=10.0) == 7


def test_a_time_budget_re_plans_the_schedule_after_the_second_epoch(
    photo_dir, tmp_path, monkeypatch
):
    """With time left for one more epoch than --epochs planned, the run trains it, on a
    schedule re-planned to the new total, and records the total."""
    import training.train as train

    monkeypatch.setattr(train, "epochs_within", lambda left_s, done, epoch_s: done + 1)
    run = tmp_path / "budget"
    assert train.main(["--data", str(photo_dir), "--run-dir", str(run), "--image-size", "64",
                       "--epochs", "2", "--batch-size", "16", "--limit-per-class", "8",
                       "--run-eagerly", "--time-budget", "3600"]) == 0  # fmt: skip
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    rows = (run / "log.csv").read_text().strip().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["0", "1", "2"]
    assert json.loads((run / "report.json").read_text())["epochs_completed"] == 3


def test_a_spent_time_budget_stops_the_run_and_a_split_without_its_validation_photos(
    tiny_run, photo_dir, tmp_path, monkeypatch
):
    """Out of time after the first epoch: the run ends there and still makes final.keras and
    its report. --split reuses another run's photos; with only its training photos at hand (as
    on a lent GPU machine) the run trains without validation."""
    import training.train as train

    split = json.loads((tiny_run / "split.json").read_text())
    only_train = tmp_path / "only-train"
    for name in split["train"]:
        (only_train / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo_dir / name, only_train / name)
    monkeypatch.setattr(train.TimeBudget, "left", lambda self: 0.0)
    run = tmp_path / "spent"
    assert train.main(["--data", str(only_train), "--run-dir", str(run), "--image-size", "64",
                       "--epochs", "50", "--batch-size", "16", "--run-eagerly",
                       "--split", str(tiny_run / "split.json"),
                       "--time-budget", "1"]) == 0  # fmt: skip
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    assert (run / "final.keras").is_file()
    ours = json.loads((run / "split.json").read_text())
    assert (sorted(ours["train"]), ours["val"]) == (sorted(split["train"]), [])
    report = json.loads((run / "report.json").read_text())
    assert report["validation"] is None and report["best_epoch"] is None
    assert "nan" in (run / "log.csv").read_text()


def test_a_time_budget_is_refused_for_several_processes(photo_dir, tmp_path, monkeypatch, capsys):
    import training.train as train

    monkeypatch.setattr(train, "start_processes", lambda: None)
    monkeypatch.setattr(train, "processes", lambda: (0, 2))
    assert train.main(["--data", str(photo_dir), "--run-dir", str(tmp_path / "run"),
                       "--time-budget", "60"]) == 2  # fmt: skip
    assert "--time-budget is for one process" in capsys.readouterr().err


def test_validation_photos_are_scored_on_the_pixels_the_service_makes(tmp_path):
    """The photos kept for training are shrunk first (to twice the training size), which moves a
    large photo's centre crop by a pixel; validation must use the served pixels instead."""
    from PIL import Image

    from contract.preprocess import preprocess_file
    from training.data import eval_arrays, load_folder, served_arrays

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        noise = rng.integers(0, 256, (1503, 2011, 3), dtype=np.uint8)  # detail at every pixel
        Image.fromarray(noise).save(tmp_path / label / "large.jpg", quality=95)
    size = 64
    dataset = load_folder(tmp_path, keep_side=2 * size)
    served = served_arrays(dataset, size)
    for row, path in zip(served, dataset.paths, strict=True):
        np.testing.assert_array_equal(row, preprocess_file(tmp_path / path, size))
    assert not np.array_equal(eval_arrays(dataset, size), served)  # what it used before


def test_weights_that_saw_the_validation_photos_of_another_split_are_refused(tmp_path):
    """--init-from one run with --split of another: the scores would count photos the starting
    weights were trained on."""
    from training.data import DataError
    from training.train import refuse_seen_validation

    def run(name: str, train: list[str], val: list[str]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        split = {"class_names": ["a", "b"], "train": train, "val": val}
        (folder / "split.json").write_text(json.dumps(split))
        return folder

    a = run("a", ["a/1.jpg", "b/1.jpg"], ["a/2.jpg", "b/2.jpg"])
    b = run("b", ["a/2.jpg", "b/1.jpg"], ["a/1.jpg", "b/2.jpg"])  # another seed: a/1 moved
    with pytest.raises(DataError, match=r"trained on 1 of the validation photos .* a/1\.jpg"):
        refuse_seen_validation(a, b)
    same = run("c", ["a/1.jpg", "b/1.jpg"], ["a/2.jpg", "b/2.jpg"])
    refuse_seen_validation(a, same)  # the same split: nothing seen
    refuse_seen_validation(a / "final.keras", same)  # a .keras file: its run's split
    custom = tmp_path / "b-split.json"  # a split file by another name is read as it is
    shutil.copy(b / "split.json", custom)
    with pytest.raises(DataError, match="trained on 1 of the validation photos"):
        refuse_seen_validation(a, custom)


def test_a_mixed_precision_run_resumes_with_its_loss_scale():
    """Under mixed_float16 compile wraps the optimizer in a LossScaleOptimizer (more variables
    than a bare AdamW): resuming and --time-budget's re-plan must carry its state over."""
    import keras

    from training.train import compile_model, make_optimizer, new_model, replan_optimizer

    cfg = {"variant": "xxs", "transformer_dropout": 0.0, "padding": "symmetric", "epochs": 4,
           "warmup_epochs": 1, "lr": 1e-3, "weight_decay": 0.05, "ema": True,
           "ema_momentum": 0.99, "label_smoothing": 0.1, "jit_compile": False}  # fmt: skip
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = new_model(cfg, 3, 64)
        compile_model(model, cfg, make_optimizer(cfg, 2))
        model.optimizer.build(model.trainable_variables)
        model.optimizer.iterations.assign(7)  # as if it had trained 7 steps
        model.optimizer.dynamic_scale.assign(1024.0)
        saved = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
        replan_optimizer(model, {**cfg, "epochs": 6}, 2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert int(model.optimizer.iterations) == 7 and float(model.optimizer.dynamic_scale) == 1024
    carried = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    assert len(carried) == len(saved)
    for new, old in zip(carried, saved, strict=True):
        np.testing.assert_array_equal(new, old)
