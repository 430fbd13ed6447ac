"""One client: does batching change latency? Batching on and off, request by request.

    python -m bench.p99_ab --model models/flowers-mobilevit-xxs

For each mode of `bench.serve` (default: "2proc", the shipped deployment, and "1proc"), starts
two servers side by side: the mode as it is ("on") and the same with MAX_BATCH_SIZE=1 ("off").
One client then sends the same photo to both, pair after pair, in a random order within each
pair, over one keep-alive connection to each. Both sides see the same moments of this machine,
whose speed drifts by 20% within minutes, so whatever differs between their latencies comes
from the servers, not from when they were measured. (Comparing separate 5-second rounds, as
`bench.serve` does, mixes the two.)

The two servers are not alike even with the same settings: in A/A runs (`--control`, both
sides "on") the one started first, on the lower port, was 0.05-0.10 ms slower at p50 every time.
So each mode runs in two halves, "on" started first and then "off" started first (new servers
each time), and the sides are pooled: that bias then falls on both alike.

Prints p50, p90, p99, p99.9 and the worst latency of each side, and, for p50 and p99, the
difference on-off with a 95% bootstrap interval over the pairs, and that difference in each half.
An interval that holds 0 means no difference was found at this number of requests; halves that
disagree show how much two server processes differ by themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.serve import DEFAULT_PHOTOS, MODES, ROOT, photo_files, start_server

PERCENTILES = (50, 90, 99, 99.9)


def post(conn: http.client.HTTPConnection, body: bytes) -> float:
    """Seconds for one /predict round trip (the body fully read); raises on a non-200."""
    start = time.perf_counter()
    conn.request("POST", "/predict?top_k=1", body, {"Content-Type": "image/jpeg"})
    response = conn.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - start
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {payload[:200]!r}")
    return elapsed


def bootstrap_diff(on: np.ndarray, off: np.ndarray, q: float, rounds: int, seed: int):
    """The q-th percentile of `on` minus that of `off`, and its 95% interval, resampling pairs."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(on), size=(rounds, len(on)))
    diffs = np.percentile(on[index], q, axis=1) - np.percentile(off[index], q, axis=1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return np.percentile(on, q) - np.percentile(off, q), low, high


@contextlib.contextmanager
def servers_side_by_side(model: Path, port: int, envs: list[dict]) -> Iterator[list[int]]:
    """One server per environment, on `port`, `port` + 1, ...; yields their ports."""
    servers, temp_dirs = [], []
    try:
        for offset, extra in enumerate(envs):
            # Each server its own slot files and metrics directory: they must not share slots.
            temp = tempfile.mkdtemp(prefix="bench-side-")
            temp_dirs.append(temp)
            env = {**extra, "MOBILEVIT_MODEL_DIR": str(model.resolve()),
                   "MOBILEVIT_INFERENCE_SLOTS_DIR": os.path.join(temp, "slots")}  # fmt: skip
            if "WEB_CONCURRENCY" in env:
                env["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(temp, "metrics")
                os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"])
            servers.append(start_server(port + offset, env))
        yield [port + offset for offset in range(len(envs))]
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        for temp in temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def measure_pairs(model: Path, port: int, envs: list[dict], requests: int, warmup: int,
                  seed: int, blobs: list[bytes]) -> np.ndarray:  # fmt: skip
    """Latencies (ms), [requests, 2]: each photo to both servers, in a random order per pair."""
    with servers_side_by_side(model, port, envs) as ports:
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for port in ports]
        for k in range(warmup):  # connections open, caches warm, on both sides
            for conn in conns:
                post(conn, blobs[k % len(blobs)])
        order = random.Random(seed)
        latencies = np.zeros((requests, 2))
        for i in range(requests):
            body = blobs[i % len(blobs)]
            sides = [0, 1]
            order.shuffle(sides)
            for side in sides:
                latencies[i, side] = post(conns[side], body) * 1000
        for conn in conns:
            conn.close()
    return latencies


def run_pair(mode: str, args, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Latencies (ms) of `args.requests` pairs against `mode` with batching on and off (with
    `args.control`, on twice), half with each side started first; and p50 on-off per half."""
    on = MODES[mode]
    off = on if args.control else {**on, "MOBILEVIT_MAX_BATCH_SIZE": "1"}
    halves, half_p50 = [], []
    for on_first in (True, False):
        envs = [on, off] if on_first else [off, on]
        pairs = measure_pairs(args.model, args.port, envs, args.requests // 2, args.warmup,
                              args.seed + on_first, blobs)  # fmt: skip
        if not on_first:
            pairs = pairs[:, ::-1]  # columns: on, off
        halves.append(pairs)
        half_p50.append(float(np.percentile(pairs[:, 0], 50) - np.percentile(pairs[:, 1], 50)))
    latencies = np.concatenate(halves)
    return latencies[:, 0], latencies[:, 1], half_p50


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/flowers-mobilevit-xxs")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--modes", default="2proc,1proc", help=f"comma-separated, of {sorted(MODES)}")
    p.add_argument("--requests", type=int, default=4000, help="pairs of requests per mode")
    p.add_argument("--warmup", type=int, default=50, help="pairs sent before measuring")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8765, help="first server; the second gets port + 1")
    p.add_argument(
        "--control", action="store_true", help="A/A: the second side is 'on' too (no batching off)"
    )
    args = p.parse_args(argv)

    blobs = [f.read_bytes() for f in photo_files(args.photos, 64)]
    sides = "the same server settings twice (A/A)" if args.control else "batching on and off"
    print(f"1 client, {args.requests} pairs per mode (the same photo to {sides}, in random order;"
          f" half with each side started first), {len(blobs)} real JPEG photos as raw image/jpeg"
          f" bodies, {os.cpu_count()} CPUs; latencies in ms\n")  # fmt: skip
    heads = "".join(f"{'p' + format(q, 'g'):>8}" for q in PERCENTILES)
    print(f"{'mode':<8}{'batching':>9}{heads}{'worst':>8}")
    summaries = []
    for mode in args.modes.split(","):
        on, off, half_p50 = run_pair(mode, args, blobs)
        for name, values in (("on", on), ("on again" if args.control else "off", off)):
            cells = "".join(f"{np.percentile(values, q):>8.2f}" for q in PERCENTILES)
            print(f"{mode:<8}{name:>9}{cells}{values.max():>8.1f}", flush=True)
        for q in (50, 99):
            diff, low, high = bootstrap_diff(on, off, q, args.bootstrap, args.seed)
            halves = "" if q != 50 else "   halves: " + ", ".join(f"{d:+.2f}" for d in half_p50)
            summaries.append(f"{mode:<8}{'p' + str(q):>5}{diff:>+10.2f}   [{low:+.2f}, {high:+.2f}]"
                             f"   {np.mean(on > off):>6.0%}{halves}")  # fmt: skip
    print(f"\non - off (ms), 95% bootstrap interval over the pairs; 'on slower' is the share of "
          f"pairs where on took longer;\nhalves: p50 on - off with on started first, then with "
          f"off started first\n{'mode':<8}{'':>5}{'on - off':>10}   interval"
          f"{'':>10}on slower")  # fmt: skip
    print("\n".join(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
