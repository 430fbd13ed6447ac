"""training.device: the photos packed without changing a pixel, the run's tar written however
the run ends, and the tar back as a run directory here. The rehearsal of a whole device run
under JAX on two CPU devices is the slow test."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pytest
from PIL import Image

from training import device

needs_jpegtran = pytest.mark.skipif(
    not shutil.which("jpegtran"), reason="jpegtran (libjpeg-turbo-progs) not installed"
)


def jpeg(exif_orientation: int | None = None) -> bytes:
    image = Image.radial_gradient("L").convert("RGB").resize((96, 64))
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes(), comment=b"x" * 500)
    return out.getvalue()


def test_pins_come_from_the_constraints_file():
    import keras

    assert device.pinned("keras") == f"keras=={keras.__version__}"
    with pytest.raises(SystemExit):
        device.pinned("no-such-package")


def test_the_device_command_starts_where_keras_and_pydantic_are_missing():
    """As on the lent machine, before the packed packages are unpacked."""
    import subprocess
    import sys

    from tests.serving_helpers import REPO

    code = ("import runpy, sys; sys.modules.update(keras=None, pydantic=None); "
            "sys.argv = ['device', 'train', '--help']; "
            "runpy.run_module('training.device', run_name='__main__')")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--budget" in result.stdout


def test_the_packed_packages_are_unpacked_only_where_missing(tmp_path, monkeypatch):
    import sys

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "module.py").write_text("x = 1\n")
    with tarfile.open(tmp_path / "site.tar.xz", "w:xz") as tar:
        tar.add(tmp_path / "pkg", arcname="pkg")
    assert device.unpacked_site(tmp_path / "site.tar.xz", tmp_path / "site") is None  # here
    monkeypatch.setattr(sys, "executable", "false")  # the probe's `import keras` fails
    assert device.unpacked_site(tmp_path / "site.tar.xz", tmp_path / "site") == tmp_path / "site"
    assert (tmp_path / "site" / "pkg" / "module.py").read_text() == "x = 1\n"


@needs_jpegtran
def test_a_packed_photo_is_smaller_and_decodes_to_the_same_pixels(tmp_path):
    source, target = tmp_path / "a.jpg", tmp_path / "b.jpg"
    source.write_bytes(jpeg())
    device.shrink(source, target)
    assert target.stat().st_size < source.stat().st_size
    assert device.decoded_digest(target.read_bytes()) == device.decoded_digest(jpeg())


@needs_jpegtran
def test_a_photo_whose_metadata_turns_it_is_copied_as_it_is(tmp_path):
    """Without its EXIF orientation the photo would decode unrotated: it travels unchanged."""
    source, target = tmp_path / "a.jpg", tmp_path / "b.jpg"
    source.write_bytes(jpeg(exif_orientation=6))
    device.shrink(source, target)
    assert target.read_bytes() == source.read_bytes()


def test_a_failed_run_still_writes_its_tar(tmp_path):
    code = device.main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path),
                        "--budget", "5"])  # fmt: skip
    assert code == 2  # training.train's clear error for a missing folder
    with tarfile.open(tmp_path / "flowers-xxs.tar") as tar:
        assert tar.getnames() == ["config.json"]  # written before the photos were read


def test_unpack_points_the_run_at_the_original_photos(tmp_path):
    pack = tmp_path / "pack"
    pack.mkdir()
    packed_split = {"train": ["a/1.jpg"], "val": ["a/2.jpg"], "class_names": ["a"]}
    (pack / "split.json").write_text(json.dumps(packed_split))
    (pack / "source.json").write_text(json.dumps({"data": "../shared/datasets/flower_photos",
                                                  "split": str(pack / "split.json")}))  # fmt: skip
    run = tmp_path / "made-there"
    run.mkdir()
    split = {"root": ".device/photos", "train": ["a/1.jpg"], "val": [], "class_names": ["a"]}
    (run / "split.json").write_text(json.dumps(split))
    (run / "config.json").write_text(json.dumps({"data": ".device/photos", "epochs": 9}))
    with tarfile.open(tmp_path / "r.tar", "w") as tar:
        for name in ("split.json", "config.json"):
            tar.add(run / name, arcname=name)
    assert device.unpack(tmp_path / "r.tar", tmp_path / "here", pack) == 0
    split = json.loads((tmp_path / "here" / "split.json").read_text())
    assert (split["root"], split["val"]) == ("../shared/datasets/flower_photos", ["a/2.jpg"])
    config = json.loads((tmp_path / "here" / "config.json").read_text())
    assert (config["data"], config["epochs"]) == ("../shared/datasets/flower_photos", 9)


@pytest.mark.slow
def test_a_device_run_rehearsed_on_two_cpu_devices(tiny_run, photo_dir, tmp_path, monkeypatch):
    """`train` and `unpack` as on the lent machine, on a tiny subset: JAX, data parallel over
    two devices, a time budget, only the training photos there; the run comes back scored on
    the validation photos here and exports as usual. (`pack` needs jpegtran and PyPI.)"""
    pytest.importorskip("jax")
    from training.export import main as export_main

    for name, value in (("JAX_PLATFORMS", "cpu"), ("JAX_NUM_CPU_DEVICES", "2")):
        monkeypatch.setenv(name, value)
    split = json.loads((tiny_run / "split.json").read_text())
    there = tmp_path / "photos-there"
    for name in split["train"]:
        (there / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo_dir / name, there / name)
    pack = tmp_path / "pack"
    pack.mkdir()
    source = {"data": os.fspath(photo_dir), "split": str(tiny_run / "split.json")}
    (pack / "source.json").write_text(json.dumps(source))
    code = device.main(["train", "--data", str(there), "--split", str(tiny_run / "split.json"),
                        "--out", str(tmp_path), "--run-dir", str(tmp_path / "there"),
                        "--budget", "40", "--pack", str(pack), "--",
                        "--image-size", "64", "--multi-scale", "64,96", "--batch-size", "8",
                        "--color-jitter", "0"])  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "there" / "report.json").read_text())["validation"] is None
    run = tmp_path / "here"
    assert device.unpack(tmp_path / "flowers-xxs.tar", run, pack) == 0
    assert (run / "last.keras").is_file()
    report = json.loads((run / "report.json").read_text())
    assert (report["versions"]["backend"], report["devices"]) == ("jax", 2)
    assert report["val_images"] == len(split["val"]) and 0 <= report["validation"]["top1"] <= 1
    assert report["data"] == os.fspath(photo_dir)
    assert report["epochs_completed"] == json.loads((run / "config.json").read_text())["epochs"]
    assert export_main([str(run), "--out", str(tmp_path / "model"), "--quantizations",
                        "float32", "--calibration-images", "8"]) == 0  # fmt: skip
