"""Training under JAX, data parallel over two CPU devices (JAX_NUM_CPU_DEVICES=2): the loss
falls, the run says it used both devices, and its weights export as usual (under TensorFlow).
Slow: two processes on localhost training one model (KERAS_DISTRIBUTION_*)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.serving_helpers import REPO

pytest.importorskip("jax", reason="jax is in the train extra; not installed here")


def test_a_jax_run_on_two_devices_learns_and_exports(photo_dir, tmp_path):
    """Multi-scale too: JAX compiles the step once per batch size it meets."""
    from contract.card import load_model_card
    from training.export import main as export_main

    run = tmp_path / "jax-run"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_NUM_CPU_DEVICES": "2",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--data", str(photo_dir), "--run-dir", str(run),
         "--image-size", "64", "--epochs", "4", "--batch-size", "8", "--warmup-epochs", "1",
         "--no-ema", "--min-scale", "0.6", "--color-jitter", "0", "--val-fraction", "0.25",
         "--multi-scale", "64,96"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel over 2 devices" in result.stderr
    report = json.loads((run / "report.json").read_text())
    assert (report["versions"]["backend"], report["devices"]) == ("jax", 2)
    with open(run / "log.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert losses[-1] < losses[0]
    out = tmp_path / "model"
    assert export_main([str(run), "--out", str(out), "--quantizations", "float32",
                        "--calibration-images", "8"]) == 0  # fmt: skip
    assert load_model_card(out).labels == ["blue", "green", "red"]


@pytest.mark.slow  # ~100 s of XLA compiles in both processes; the fast suite has the 2-device run
def test_two_processes_train_one_model_in_lockstep(photo_dir, tmp_path):
    """Two processes on localhost (KERAS_DISTRIBUTION_*), one CPU device each, gradients
    exchanged through gloo: both write the same model, process 0 into the run directory."""
    import socket

    import keras
    import numpy as np

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = tmp_path / "two-processes"
    command = [sys.executable, "-m", "training.train", "--data", str(photo_dir), "--run-dir",
               str(run), "--image-size", "64", "--epochs", "3", "--batch-size", "8",
               "--warmup-epochs", "1", "--no-ema", "--min-scale", "0.6", "--color-jitter", "0",
               "--val-fraction", "0.25", "--limit-per-class", "12"]  # fmt: skip
    processes = []
    for index in range(2):
        env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
               "JAX_NUM_CPU_DEVICES": "1",
               "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
               "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
               "KERAS_DISTRIBUTION_PROCESS_ID": str(index)}  # fmt: skip
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    assert "data parallel over 2 devices in 2 process(es)" in outputs[0]
    report = json.loads((run / "report.json").read_text())
    assert (report["devices"], report["processes"]) == (2, 2)
    copy = json.loads((run / "process-1" / "report.json").read_text())
    assert copy["validation"] == report["validation"]
    with open(run / "log.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert losses[-1] < losses[0]
    first, second = (keras.models.load_model(d / "final.keras").get_weights()
                     for d in (run, run / "process-1"))  # fmt: skip
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
