"""A rolling restart under load, the way Kubernetes does it, counting failed requests.

    python -m bench.rollout --model models/flowers-mobilevit-xxs

Two replicas (`python -m app`, as the image runs it) behind haproxy on loopback, which health-
checks /health/ready and never retries a request (`retries 0`, no redispatch), so every request
that reaches a replica going away counts as a failure. wrk drives steady load through haproxy
for the whole run. Each replica in turn is replaced as Kubernetes replaces a pod: taken out of
the endpoints (haproxy `maint`: no new requests, in-flight ones finish), a preStop pause,
SIGTERM (uvicorn stops accepting, answers what it holds, exits), a new process started, ready,
back in the endpoints. Twice: the same model (a restart), then a new model directory (the
model-update case; the new version must be what answers at the end). Needs haproxy and wrk
(apt-get install haproxy wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.serve import (
    DEFAULT_PHOTOS,
    ROOT,
    photo_bodies,
    photo_files,
    port_in_use,
    start_server,
)

HAPROXY = """
global
    stats socket {socket} mode 600 level admin
defaults
    mode http
    retries 0
    option http-server-close
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend front
    bind 127.0.0.1:{front}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /health/ready
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def haproxy_command(socket_path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        sock.sendall(command.encode() + b"\n")
        return sock.recv(65536).decode()


def version_at(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())["version"]


def replace(
    name: str, replicas: dict, model_dir: Path, socket_path: Path, pause: float, drain: bool
) -> None:
    """One replica replaced as Kubernetes replaces a pod (without `drain`: SIGTERM at once,
    still in the endpoints, as a pod without a preStop pause would be)."""
    port, proc = replicas[name]
    if drain:
        haproxy_command(socket_path, f"set server replicas/{name} state maint")  # endpoint removed
        time.sleep(pause)  # preStop
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    env = {"MOBILEVIT_MODEL_DIR": str(model_dir)}
    replicas[name] = (port, start_server(port, env))  # returns once /health is 200
    haproxy_command(socket_path, f"set server replicas/{name} state ready")
    time.sleep(1.5)  # haproxy's check marks it up; the next pod waits for that, as rollouts do


def wrk_failures(out: str) -> tuple[int, int, int]:
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return (requests, int(non2xx.group(1)) if non2xx else 0,
            sum(int(g) for g in sock.groups()) if sock else 0)  # fmt: skip


def new_version(model_dir: Path, into: Path) -> Path:
    """A copy of the model directory whose card says version <x>.<y>.<z+1> (same artifacts)."""
    shutil.copytree(model_dir, into)
    card = json.loads((into / "model.json").read_text())
    major, minor, patch = card["version"].split(".")
    card["version"] = f"{major}.{minor}.{int(patch) + 1}"
    (into / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    return into


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/flowers-mobilevit-xxs")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--pause", type=float, default=2.0, help="preStop seconds")
    p.add_argument(
        "--no-drain",
        action="store_true",
        help="the control: SIGTERM while still in the endpoints, no preStop pause",
    )
    args = p.parse_args(argv)
    for tool in ("haproxy", "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install {tool}")
    photos = photo_files(args.photos, 32)
    model = args.model.resolve()
    steps = "SIGTERM, start, ready" if args.no_drain else f"maint, {args.pause:g} s preStop, " \
        "SIGTERM, start, ready"  # fmt: skip
    print(f"2 replicas of {model.name} behind haproxy (retries 0), wrk -c{args.clients} through "
          f"it; each replica replaced in turn ({steps})\n")  # fmt: skip
    print(f"{'rollout':<26}{'requests':>9}{'non-2xx':>9}{'socket errors':>15}  version after")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        updated = new_version(model, tmp_path / "updated")
        front = free_port()
        ports = {"a": free_port(), "b": free_port()}
        if port_in_use(front):
            raise SystemExit(f"port {front} is in use")
        socket_path = tmp_path / "haproxy.sock"
        servers = "\n".join(f"    server {n} 127.0.0.1:{port} check" for n, port in ports.items())
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY.format(socket=socket_path, front=front, servers=servers))
        replicas = {n: (port, start_server(port, {"MOBILEVIT_MODEL_DIR": str(model)}))
                    for n, port in ports.items()}  # fmt: skip
        proxy = subprocess.Popen(["haproxy", "-f", str(config), "-db"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(2)
            for label, target in (("restart, same model", model), ("new model directory", updated)):
                seconds = int(len(ports) * (args.pause + 12)) + 6
                env = {**os.environ, **photo_bodies(photos)}
                wrk = subprocess.Popen(
                    ["wrk", "-t1", f"-c{args.clients}", f"-d{seconds}s", "--timeout", "10s",
                     "-s", str(ROOT / "bench/wrk_bodies.lua"), f"http://127.0.0.1:{front}/predict"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                )  # fmt: skip
                time.sleep(3)
                for name in ports:
                    replace(name, replicas, target, socket_path, args.pause, not args.no_drain)
                out, err = wrk.communicate()
                if wrk.returncode != 0:
                    raise SystemExit(f"wrk failed: {err}")
                requests, non2xx, errors = wrk_failures(out)
                versions = sorted({version_at(port) for port in ports.values()})
                print(f"{label:<26}{requests:>9}{non2xx:>9}{errors:>15}  {','.join(versions)}",
                      flush=True)  # fmt: skip
        finally:
            proxy.terminate()
            proxy.wait(10)
            for _, proc in replicas.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
