"""The timm converter, proven against timm itself without torch: a randomised timm mobilevit_xxs
(tests/fixtures, made by make_timm_golden.py with torch + timm) converts to a Keras model whose
log-probabilities match timm's within 1e-4 plus 1e-5 of their size (float32 kernels differ by
CPU, and a log-probability reaches -75 here), with the same top-5, at 256 and 224 px; and every
kind of wrong file is a one-line error naming what was found."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from training.pretrained import CheckpointError, convert, main, read_safetensors, timm_table

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT = FIXTURES / "timm_mobilevit_xxs_random.safetensors"
GOLDEN = np.load(FIXTURES / "timm_mobilevit_xxs_golden.npz")


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    return read_safetensors(CHECKPOINT)


@pytest.mark.parametrize("size", [256, 224])
def test_converted_model_equals_timm(tensors, size):
    model = convert(tensors, size)
    images = GOLDEN[f"images_{size}"]
    expected = GOLDEN[f"log_probs_{size}"]
    got = np.log(model.predict(images.astype(np.float32), verbose=0).astype(np.float64))
    # An Intel host differed by up to 1.7e-4 on log-probabilities of -46; a wrong mapping is off
    # by whole units.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.argsort(-got, 1)[:, :5], np.argsort(-expected, 1)[:, :5])
    # The check means something only if the output depends on the input.
    assert len({tuple(row) for row in np.argsort(-expected, 1)[:, :5]}) == len(expected)
    assert np.abs(expected[0] - expected[1]).max() > 1.0


def test_the_table_maps_every_tensor_once(tensors):
    prefixes = [prefix for _, _, prefix in timm_table("xxs")]
    assert len(prefixes) == len(set(prefixes))
    mapped = {k for k in tensors if k.rsplit(".", 1)[0] in prefixes or
              k.rsplit(".", 2)[0] in prefixes}  # fmt: skip
    weights = {k for k in tensors if not k.endswith("num_batches_tracked")}
    assert mapped >= weights


def test_the_cli_writes_a_loadable_keras_model_and_flips_the_stem(tmp_path, tensors):
    import keras

    out = tmp_path / "xxs.keras"
    assert main([str(CHECKPOINT), "--out", str(out), "--image-size", "224"]) == 0
    model = keras.saving.load_model(out)
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 1000)
    rgb = tmp_path / "rgb.keras"
    assert main([str(CHECKPOINT), "--out", str(rgb), "--source-channels", "rgb"]) == 0
    flipped = model.get_layer("stem_conv").get_weights()[0]
    kept = keras.saving.load_model(rgb).get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(flipped, kept[:, :, ::-1, :])


def write(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t, d: d.joinpath("model.pth").write_bytes(pickle.dumps({"a": 1})) and
         d / "model.pth", "never unpickled"),
        (lambda t, d: d.joinpath("weights.bin").write_bytes(b"PK\x03\x04" + b"\0" * 64) and
         d / "weights.bin", "never unpickled"),
        (lambda t, d: d.joinpath("cut.safetensors").write_bytes(CHECKPOINT.read_bytes()[:5000])
         and d / "cut.safetensors", "not a readable safetensors file"),
        (lambda t, d: write(d / "v2.safetensors", {"stages.2.1.transformer.0.attn.qkv_proj.weight":
                                                   np.zeros((3, 3), np.float32)}), "MobileViT v2"),
        (lambda t, d: write(d / "resnet.safetensors", {"conv1.weight": np.zeros((64, 3, 7, 7),
                            np.float32), "layer1.0.conv1.weight": np.zeros(1, np.float32)}),
         "ResNet"),
        (lambda t, d: write(d / "missing.safetensors", {k: v for k, v in t.items()
                            if not k.startswith("stages.3.1.transformer.2.mlp.fc1")}),
         "missing key stages.3.1.transformer.2.mlp.fc1.weight"),
        (lambda t, d: write(d / "extra.safetensors", {**t, "stages.5.0.conv.weight":
                                                     np.zeros(3, np.float32)}),
         "unexpected key stages.5.0.conv.weight"),
        (lambda t, d: write(d / "shape.safetensors", {**t, "stages.1.1.conv3_1x1.conv.weight":
                                                     np.zeros((24, 40, 1, 1), np.float32)}),
         "shape mismatch at stages.1.1.conv3_1x1.conv.weight"),
    ],
    ids=["pickle", "zip-pth", "truncated", "mobilevit-v2", "resnet", "missing", "extra", "shape"],
)  # fmt: skip
def test_wrong_files_are_one_line_errors(tensors, tmp_path, capsys, make, message):
    path = make(tensors, tmp_path)
    with pytest.raises(CheckpointError, match=message):
        convert(read_safetensors(path))
    assert main([str(path), "--out", str(tmp_path / "out.keras")]) == 2
    error = capsys.readouterr().err
    assert message.split()[0] in error and error.count("\n") == 1


def test_a_pickle_is_never_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "pwned", "x"))

    buffer = io.BytesIO()
    pickle.dump(Boom(), buffer)
    (tmp_path / "evil.safetensors").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError):
        read_safetensors(tmp_path / "evil.safetensors")
    assert not (tmp_path / "pwned").exists()


def test_fine_tune_from_the_checkpoint_end_to_end(photo_dir, tmp_path, tensors):
    """The plumbing, not accuracy: timm weights in, a run for the folder's classes, an export
    whose model.json says where the weights came from."""
    import json

    import keras

    from training.export import main as export_main
    from training.train import main as train_main

    run = tmp_path / "tuned"
    assert train_main(["--data", str(photo_dir), "--run-dir", str(run), "--init-from",
                       str(CHECKPOINT), "--image-size", "64", "--epochs", "1", "--batch-size",
                       "8", "--lr", "1e-9", "--no-ema", "--run-eagerly"]) == 0  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert (config["padding"], config["warmup_epochs"]) == ("symmetric", 1.0)  # pretrained recipe
    report = json.loads((run / "report.json").read_text())
    assert report["pretrained"]["file"] == CHECKPOINT.name
    tuned = keras.saving.load_model(run / "final.keras")
    assert tuned.output_shape == (None, 3)  # the folder's classes, not ImageNet's 1000
    donor = convert(tensors, 64)
    layer = "layer4_mvit_to_d"
    np.testing.assert_allclose(tuned.get_layer(layer).get_weights()[0],
                               donor.get_layer(layer).get_weights()[0], atol=1e-6)  # fmt: skip
    out = tmp_path / "model"
    assert export_main([str(run), "--out", str(out), "--quantizations", "float32"]) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["pretrained"]["sha256"] == report["pretrained"]["sha256"]
