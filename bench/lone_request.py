"""One request at a time, with pauses between them: is a lone request faster on both cores?

    python -m bench.lone_request --model models/flowers-mobilevit-xxs

IDLE_INFERENCE_THREADS runs a request that is alone on the host on a 2-thread interpreter.
`bench.serve` and `bench.p99_ab` send their next request the moment the previous one is
answered, so the cores never rest. A person with curl, or a camera sending a photo a second,
leaves pauses, and after a pause this machine's idle cores take time to wake. Here two servers
run side by side, "2proc" as shipped (IDLE_INFERENCE_THREADS off) and "2proc-wide" (on), and one
client sends each of them blocks of requests with a fixed pause after every answer, alternating
the servers block by block so both see the same moments of the machine. The second table times
the interpreters alone, in process, after the same pauses.
"""

from __future__ import annotations

import argparse
import http.client
import os
import time
from pathlib import Path

import numpy as np

from bench.p99_ab import post, servers_side_by_side
from bench.serve import DEFAULT_PHOTOS, MODES, ROOT, photo_files
from contract.card import load_model_card
from contract.preprocess import preprocess_bytes
from contract.runtime import open_backend

SIDES = ("2proc", "2proc-wide")


def over_http(args, blobs: list[bytes], gaps: list[float]) -> dict[tuple[float, str], list]:
    """Latencies (ms) per (pause, mode)."""
    latencies: dict[tuple[float, str], list] = {}
    with servers_side_by_side(args.model, args.port, [MODES[m] for m in SIDES]) as ports:
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for port in ports]
        for k in range(10):  # connections open, interpreters used once
            for conn in conns:
                post(conn, blobs[k])
        sent = 0
        for gap in gaps:
            for block in range(args.blocks):
                sides = list(range(len(SIDES)))[:: 1 if block % 2 == 0 else -1]
                for side in sides:
                    # uvicorn closes a connection idle for 5 s, as the other side's was for
                    # a block: a new one, as curl would open (its connect is in the latency).
                    conns[side].close()
                    for _ in range(args.requests):
                        time.sleep(gap)
                        ms = post(conns[side], blobs[sent % len(blobs)]) * 1000
                        latencies.setdefault((gap, SIDES[side]), []).append(ms)
                        sent += 1
        for conn in conns:
            conn.close()
    return latencies


def in_process(args, blobs: list[bytes], gaps: list[float]) -> dict[tuple[float, int], list]:
    """Milliseconds of `predict` per (pause, interpreter threads), the two alternated."""
    card = load_model_card(args.model)
    path = args.model / card.artifact("tflite").file
    size = card.input.height
    images = [preprocess_bytes(blob, size)[None] for blob in blobs]
    backends = {threads: open_backend("tflite", path, threads) for threads in (1, 2)}
    for backend in backends.values():
        backend.predict(images[0])
    times: dict[tuple[float, int], list] = {}
    for gap in gaps:
        for k in range(args.blocks * args.requests):
            for threads in (1, 2) if k % 2 else (2, 1):
                time.sleep(gap)
                start = time.perf_counter()
                backends[threads].predict(images[k % len(images)])
                times.setdefault((gap, threads), []).append((time.perf_counter() - start) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/flowers-mobilevit-xxs")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--gaps", default="0,10,50,200,1000", help="pauses in ms before each request")
    p.add_argument("--blocks", type=int, default=4, help="blocks per server and pause")
    p.add_argument("--requests", type=int, default=8, help="requests per block")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    gaps = [float(g) / 1000 for g in args.gaps.split(",")]
    blobs = [f.read_bytes() for f in photo_files(args.photos, 64)]
    n = args.blocks * args.requests
    print(f"1 client, one request at a time with a pause before each; {n} requests per cell, "
          f"in blocks of {args.requests} alternating the servers; {len(blobs)} real JPEG photos "
          f"as raw bodies; {os.cpu_count()} CPUs; latencies in ms\n")  # fmt: skip
    print(f"{'pause ms':>8}  {'mode':<11}{'p50':>7}{'p90':>7}{'worst':>8}")
    for (gap, mode), values in sorted(over_http(args, blobs, gaps).items()):
        print(f"{gap * 1000:>8g}  {mode:<11}{np.percentile(values, 50):>7.2f}"
              f"{np.percentile(values, 90):>7.2f}{max(values):>8.1f}", flush=True)  # fmt: skip
    print(f"\nin process: the interpreter's predict alone, 1 and 2 threads alternated, {n} "
          f"calls per cell\n{'pause ms':>8}  {'threads':<11}{'p50':>7}{'p90':>7}"
          f"{'worst':>8}")  # fmt: skip
    for (gap, threads), values in sorted(in_process(args, blobs, gaps).items()):
        print(f"{gap * 1000:>8g}  {threads:<11}{np.percentile(values, 50):>7.2f}"
              f"{np.percentile(values, 90):>7.2f}{max(values):>8.1f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
