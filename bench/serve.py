"""This service side by side with a plain FastAPI server, and against the in-process ceiling.

    python -m bench.serve --model models/flowers-mobilevit-xxs

Starts each mode on 127.0.0.1, one at a time, in the order given and then in reverse (`--passes`):
"service", `python -m app` as `make serve` and the Docker image run it (its shape derived from
the CPUs, app/topology.py); "peer", `bench.peer`, the one-request-one-invoke FastAPI server a
user would write instead (one interpreter with a thread per core, no batching); and, with
`--modes`, "2proc" (the service with MOBILEVIT_PROCESSES=2), "off" (MAX_BATCH_SIZE=1), "1x2" (one
inference worker with 2 threads), "2x1" (INFERENCE_THREADS=1 set, so a lone request stays on one
core), "batch32" (MAX_BATCH_SIZE=32), and "v2-uint8", "v2-bytes" and "v2-json": the service
driven through v2 infer with binary UINT8 pixels, binary BYTES files, or JSON pixels. Drives
each with wrk (one load thread, real photos, one per request) at 1, 4, 16 and 64 concurrent
clients, and prints
throughput, p50/p99 latency and errors next to the ceiling: one single-thread decode + resize +
inference loop per core, run at once, summed.
"CPU busy" is how busy the machine was under load; "loop ms" and "work ms" are the server's CPU
time per request in its event-loop threads and in its other threads (decode, inference), over all
its processes; "wrk ms" is the load generator's own CPU time per request. "batch" is the mean
number of images per backend call (from /metrics; "-" for the peer); "RSS MB" the server's
resident memory, all processes, at the end of the cell.

This machine's speed drifts by +-20% within minutes, so each cell alternates ceiling and load in
several short rounds (`--rounds`) and compares their means: the drift hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.quiet import paused
from contract.card import load_model_card
from contract.preprocess import preprocess_bytes
from contract.runtime import open_backend

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PHOTOS = ROOT.parent / "shared/datasets/flower_photos"


def photo_files(folder: Path, count: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.jpg"))
    return files[:: max(1, len(files) // count)][:count]


def ceiling(model_dir: Path, artifact, blobs: list[bytes], size: int, seconds: float) -> float:
    """Images/s of decode + resize + inference in-process: one loop per core, each with a
    1-thread interpreter, run at once, summed."""
    path = model_dir / artifact.file

    def loop(backend, stop: float, counts: list[int], slot: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            backend.predict(preprocess_bytes(blobs[i % len(blobs)], size)[None])
            i += 1
        counts[slot] = i

    cpus = os.cpu_count() or 1
    backends = [open_backend(artifact.format, path, 1) for _ in range(cpus)]
    for b in backends:
        b.predict(preprocess_bytes(blobs[0], size)[None])
    counts = [0] * cpus
    start = time.perf_counter()
    pool = [threading.Thread(target=loop, args=(b, start + seconds, counts, k))
            for k, b in enumerate(backends)]  # fmt: skip
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start_server(port: int, env: dict, peer: bool = False) -> subprocess.Popen:
    """`python -m app` as `make serve` and the image run it, ready to answer; with `peer`,
    `uvicorn bench.peer:app` (one process, no access log)."""
    # Another server on the port would answer our health checks and take our load.
    if port_in_use(port):
        raise SystemExit(f"port {port} is already in use (another benchmark running?)")
    if peer:
        cmd = [sys.executable, "-m", "uvicorn", "bench.peer:app", "--host", "127.0.0.1",
               "--port", str(port), "--no-access-log"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "app"]
        env = {**env, "MOBILEVIT_HOST": "127.0.0.1", "MOBILEVIT_PORT": str(port)}
    # Its log goes to a file, as a container's goes to its log driver; shown if it fails to start.
    with tempfile.TemporaryFile() as log:  # the server keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                time.sleep(0.3)
        proc.kill()
        log.seek(0)
        tail = log.read()[-3000:].decode(errors="replace")
    raise SystemExit(f"server did not become ready (exit code {proc.poll()}):\n{tail}")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far (Linux /proc/stat); (0, 0) elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (uvicorn's worker processes), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree = [pid]
    for member in tree:
        tree.extend(child for child, parent in parents.items() if parent == member)
    return tree


def thread_cpu(pids: list[int]) -> tuple[float, float]:
    """CPU seconds so far of the processes' main threads (the event loops) and of all their
    other threads (decode, inference), from /proc; (0, 0) elsewhere."""
    loop = other = 0.0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            if task.name == str(pid):
                loop += seconds
            else:
                other += seconds
    return loop, other


def batch_totals(port: int) -> tuple[float, float]:
    """(images, backend calls) the service has run so far, summed over its processes, from
    its /metrics batch-size histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()

    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.split("{")[0].split(" ")[0] == name)  # fmt: skip

    return total("mobilevit_batch_size_sum"), total("mobilevit_batch_size_count")


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants, MB (from /proc)."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/statm").read_text().split()
        except OSError:
            continue
        total += int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    return total / 2**20


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended (wrk, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def connections_by_process(port: int) -> dict[int, int]:
    """Established connections to `port` per server process (from `ss`; {} without it)."""
    try:
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {}
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


def photo_bodies(photos: list[Path]) -> dict:
    """wrk_bodies.lua's environment for /predict: each photo as a raw image/jpeg body."""
    return {
        "BENCH_BODIES": ";".join(str(p) for p in photos),
        "BENCH_PATH": "/predict?top_k=1",
        "BENCH_CONTENT_TYPE": "image/jpeg",
    }


def v2_bodies(kind: str, photos: list[Path], size: int, model: str, folder: Path) -> dict:
    """wrk_bodies.lua's environment for one v2 request kind, one photo per request: "v2-uint8"
    (pixels resized by the client, binary), "v2-bytes" (the JPEG file as BYTES, binary) or
    "v2-json" (pixels as JSON numbers)."""
    files, lengths = [], []
    for i, photo in enumerate(photos):
        data = photo.read_bytes()
        if kind == "v2-bytes":
            blob = struct.pack("<I", len(data)) + data
            tensor = {"name": "image_bytes", "datatype": "BYTES", "shape": [1]}
        else:
            pixels = preprocess_bytes(data, size)[None]
            blob = pixels.tobytes()
            tensor = {"name": "images", "datatype": "UINT8", "shape": list(pixels.shape)}
        if kind == "v2-json":
            header, blob = (
                json.dumps({"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}),
                b"",
            )
        else:
            tensor["parameters"] = {"binary_data_size": len(blob)}
            output = {"name": "probabilities", "parameters": {"binary_data": True}}
            request = {"inputs": [tensor], "outputs": [output]}
            header = json.dumps(request)
        body = header.encode() + blob
        files.append(folder / f"{kind}-{i}.body")
        files[-1].write_bytes(body)
        lengths.append(str(len(header.encode())) if blob else "-")
    return {
        "BENCH_BODIES": ";".join(map(str, files)),
        "BENCH_HEADER_LENGTHS": ";".join(lengths),
        "BENCH_PATH": f"/v2/models/{model}/infer",
        "BENCH_CONTENT_TYPE": "application/json"
        if kind == "v2-json"
        else "application/octet-stream",
    }


def run_wrk(
    port: int,
    clients: int,
    seconds: int,
    photos: list[Path],
    server: int | None = None,
    bodies: dict | None = None,
) -> dict:
    """wrk's figures, its own CPU ms per request (client_ms) and, with the `server` pid, the
    server's (loop_ms, work_ms). With `bodies` (v2_bodies), those requests instead of photos
    posted to /predict."""
    env = {**os.environ, **(bodies or photo_bodies(photos))}
    pids = process_tree(server) if server else []
    loop0, work0 = thread_cpu(pids)
    busy0, total0 = cpu_times()
    client0 = children_cpu()
    wrk = subprocess.Popen(
        ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "--timeout", "10s",
         "-s", str(ROOT / "bench/wrk_bodies.lua"), f"http://127.0.0.1:{port}/predict"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    time.sleep(min(1.0, seconds / 2))
    ss0 = children_cpu()
    split = connections_by_process(port)
    ss_seconds = children_cpu() - ss0
    out, err = wrk.communicate()
    if wrk.returncode != 0:
        raise SystemExit(f"wrk failed: {err.strip()}")
    busy1, total1 = cpu_times()
    loop1, work1 = thread_cpu(pids)
    client_seconds = children_cpu() - client0 - ss_seconds  # wrk's own CPU, `ss` taken out
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    result["most_conns"] = max(split.values(), default=0)
    result["busy"] = (busy1 - busy0) / max(1, total1 - total0)
    requests = max(1, int(re.search(r"(\d+) requests in", out).group(1)))
    result["loop_ms"] = (loop1 - loop0) * 1000 / requests
    result["work_ms"] = (work1 - work0) * 1000 / requests
    result["client_ms"] = client_seconds * 1000 / requests
    # wrk pads second-valued latencies with a trailing space ("1.38s ").
    result["p50"] = _ms(re.search(r"^\s+50%\s+(\S+)\s*$", out, re.M).group(1))
    result["p99"] = _ms(re.search(r"^\s+99%\s+(\S+)\s*$", out, re.M).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["errors"] = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(g) for g in sock.groups()) if sock else 0
    )
    return result


MODES = {
    "service": {},  # python -m app: the shape derived from the CPUs, greedy batching
    "peer": {},  # bench.peer: one request, one invoke, on every core
    "2proc": {"MOBILEVIT_PROCESSES": "2"},
    "off": {"MOBILEVIT_MAX_BATCH_SIZE": "1"},
    "1x2": {"MOBILEVIT_INFERENCE_WORKERS": "1", "MOBILEVIT_INFERENCE_THREADS": "2"},
    "2x1": {"MOBILEVIT_INFERENCE_THREADS": "1"},  # no many-thread interpreter for a lone request
    "batch32": {"MOBILEVIT_MAX_BATCH_SIZE": "32"},
    # The service, driven through v2 infer instead of /predict (see v2_bodies).
    "v2-uint8": {},
    "v2-bytes": {},
    "v2-json": {},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/flowers-mobilevit-xxs")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--seconds", type=int, default=5, help="wrk duration per round")
    p.add_argument("--rounds", type=int, default=3, help="ceiling + load rounds per cell")
    p.add_argument("--ceiling-seconds", type=float, default=2.0, help="per ceiling round")
    p.add_argument("--passes", type=int, default=2, help="the modes in order, then reversed, ...")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--modes", default="service,peer", help=f"comma-separated, of {sorted(MODES)}")
    p.add_argument("--artifact", help="the TFLite file every mode and the ceiling use (default: "
                   "the model's default one)")  # fmt: skip
    p.add_argument(
        "--pause", type=int, action="append", default=[], metavar="PID",
        help="stop this process (a training run) while measuring (bench.quiet)",
    )  # fmt: skip
    args = p.parse_args(argv)
    with paused(args.pause) as machine:
        return run(args, machine)


def run(args: argparse.Namespace, machine: str) -> int:
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")

    card = load_model_card(args.model, verify=False)
    artifact = card.artifact("tflite", args.artifact)
    photos = photo_files(args.photos, 64)
    blobs = [f.read_bytes() for f in photos]
    size = card.input.height
    modes = args.modes.split(",")
    order = [m for k in range(args.passes) for m in (modes if k % 2 == 0 else modes[::-1])]
    print(f"model {card.name} ({artifact.file}) at {size} px; {os.cpu_count()} CPUs; "
          f"{len(photos)} real JPEG photos; wrk -t1; each cell is {args.rounds} rounds of "
          f"(ceiling, {args.seconds} s of load); order {','.join(order)}; {machine}")  # fmt: skip
    print("ceiling: one single-thread decode + resize + inference loop per core, summed; 'of "
          "ceiling' is mean req/s over\nmean ceiling of the same rounds; p50 is the rounds' "
          "median, p99 their worst\n")  # fmt: skip
    print(f"{'mode':<9}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'ceiling':>9}{'of ceiling':>12}{'CPU busy':>10}"
          f"{'loop ms':>9}{'work ms':>9}{'wrk ms':>8}{'batch':>7}{'RSS MB':>8}")  # fmt: skip
    for mode in order:
        env = {**os.environ, **MODES[mode], "MOBILEVIT_MODEL_DIR": str(args.model.resolve()),
               "MOBILEVIT_ARTIFACT": artifact.file, "MOBILEVIT_QUEUE_LIMIT": "1024"}  # fmt: skip
        peer = mode == "peer"
        bodies = None
        if mode.startswith("v2-"):
            folder = Path(tempfile.mkdtemp(prefix="bench-v2-"))
            bodies = v2_bodies(mode, photos, size, card.name, folder)
        server = start_server(args.port, env, peer=peer)
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                limits, runs = [], []
                for _ in range(args.rounds):
                    limits.append(ceiling(args.model, artifact, blobs, size, args.ceiling_seconds))
                    images0, calls0 = (0.0, 0.0) if peer else batch_totals(args.port)
                    runs.append(
                        run_wrk(args.port, clients, args.seconds, photos, server.pid, bodies)
                    )
                    images1, calls1 = (0.0, 0.0) if peer else batch_totals(args.port)
                    runs[-1]["batch"] = (images1 - images0) / max(1.0, calls1 - calls0)
                rps, limit = np.mean([r["rps"] for r in runs]), np.mean(limits)
                p50 = np.median([r["p50"] for r in runs])
                p99 = max(r["p99"] for r in runs)
                errors = sum(r["errors"] for r in runs)
                busy = np.mean([r["busy"] for r in runs])
                cpu = ("loop_ms", "work_ms", "client_ms")
                loop_ms, work_ms, wrk_ms = (np.mean([r[k] for r in runs]) for k in cpu)
                batch = "-" if peer else f"{np.mean([r['batch'] for r in runs]):.1f}"
                print(f"{mode:<9}{clients:>8}{rps:>9.1f}{p50:>9.1f}{p99:>9.1f}{errors:>8}"
                      f"{limit:>9.1f}{rps / limit:>12.2f}{busy:>10.0%}{loop_ms:>9.2f}"
                      f"{work_ms:>9.2f}{wrk_ms:>8.2f}{batch:>7}{rss_mb(server.pid):>8.0f}",
                      flush=True)  # fmt: skip
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
            if bodies:
                shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
