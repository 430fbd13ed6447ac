"""The README's httpx client (`classify.py`) runs as printed against a real `python -m app`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.serving_helpers import (
    LABELS,
    REPO,
    free_port,
    metric_value,
    server_command,
    server_env,
)


def readme_client() -> str:
    """The README's `# classify.py` code block."""
    readme = (REPO / "README.md").read_text()
    return re.search(r"```python\n(# classify\.py\n.*?)```", readme, re.S).group(1)


def test_readme_client_classifies_every_photo_through_busy_answers(
    tiny_model_dir, photo_dir, tmp_path
):
    # Room for only two bodies at once, so that most of the client's concurrent requests first
    # get 503 + Retry-After and the client's retry path is what completes them.
    photos = sorted(photo_dir.rglob("*.jpg"))[:16]
    largest = max(p.stat().st_size for p in photos) + 1024  # with the multipart envelope
    port = free_port()
    env = server_env(tiny_model_dir, max_upload_bytes=str(largest),
                     max_inflight_upload_bytes=str(2 * largest))  # fmt: skip
    server = subprocess.Popen(server_command(port), cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.time() + 90, False
        while not ready and time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    ready = True
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert ready, f"server not ready (exit code {server.poll()})"
        names = []
        for i, photo in enumerate(photos):  # as a user would: files in the working directory
            names.append(f"{photo.parent.name}-{i}.jpg")
            shutil.copy(photo, tmp_path / names[-1])
        (tmp_path / "classify.py").write_text(
            readme_client().replace("http://localhost:8000", base)
        )
        run = subprocess.run([sys.executable, "classify.py", *names], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            metrics = r.read().decode()
    finally:
        server.terminate()
        server.wait(30)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == names  # one line each, in order
    for line in lines:
        label, score = line.split(": ")[1].split()
        assert label in LABELS and 0 < float(score) <= 1
    answered = {status: metric_value(metrics, "mobilevit_http_requests_total", route="/predict",
                                     status=status) for status in ("200", "503")}  # fmt: skip
    assert answered["200"] == len(names)
    assert answered["503"] > 0  # the retries were needed, and they worked
