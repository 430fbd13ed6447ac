"""What uvicorn itself costs per request, with no app work: the floor under bench/serve.py's
"loop ms".

    python -m bench.http_floor

Serves a bare ASGI app (this module's `app`) with uvicorn exactly as bench/serve.py serves the
real one, and drives it with the same wrk load (real photos as raw image/jpeg bodies). The app
reads the whole body and answers a fixed JSON body the size of a real /predict answer after a
simulated service time, at most `--slots` requests at a time, so the request rate, and with it
how many events each wake-up of the event loop finds, is close to the real service's. With
`--handoffs N` the service time is spent sleeping in N turns on a thread pool instead, as the
service hands each request to a decode thread and then to an inference worker: what those
hand-offs cost the event loop, before any app code runs. Per-request
CPU of an event loop falls as the rate rises (more events per wake-up), so a floor measured at
thousands of requests per second would say nothing about one at 300. Each row runs twice: on
an otherwise idle machine, and with one process per core multiplying matrices, as the real
service's inference keeps the cores busy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app.settings import DEFAULT_MODEL_DIR
from bench.serve import DEFAULT_PHOTOS, photo_files, run_wrk, start_server
from contract.card import read_card

# Named after the shipped model, as the real service's answer is.
_CARD = read_card(DEFAULT_MODEL_DIR)
ANSWER = json.dumps(
    {
        "model": {"name": _CARD.name, "version": _CARD.version, "format": "tflite",
                  "artifact": _CARD.artifact("tflite").file},
        "predictions": [{"filename": None, "label": "tulips", "score": 0.912,
                         "top_k": [{"label": "tulips", "score": 0.912}]}],
        "timings_ms": {"decode": 0.712, "queue_and_inference": 5.371, "total": 6.204},
    }
).encode()  # fmt: skip
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]

_service_s = float(os.environ.get("FLOOR_SERVICE_MS", "6")) / 1000
_handoffs = int(os.environ.get("FLOOR_HANDOFFS", "0"))
_slots: asyncio.Semaphore | None = None
_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="floor")


async def app(scope, receive, send) -> None:
    """Read the body, wait the service time in one of the slots (in thread turns with
    FLOOR_HANDOFFS), answer."""
    global _slots
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    if _slots is None:
        _slots = asyncio.Semaphore(int(os.environ.get("FLOOR_SLOTS", "2")))
    async with _slots:
        if _handoffs:
            loop = asyncio.get_running_loop()
            for _ in range(_handoffs):
                await loop.run_in_executor(_threads, time.sleep, _service_s / _handoffs)
        else:
            await asyncio.sleep(_service_s)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def _spin(stop) -> None:
    """Keep one core busy with the kind of work inference is (float matrix products)."""
    a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    while not stop.is_set():
        a = a @ a
        a /= np.abs(a).max() + 1.0


def measure(args, clients: int, busy: bool, photos: list[Path], server: int) -> list[dict]:
    """`args.rounds` wrk runs, with every core kept busy by `_spin` if `busy`."""
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,))
                for _ in range((os.cpu_count() or 1) if busy else 0)]  # fmt: skip
    for spinner in spinners:
        spinner.start()
    try:
        return [run_wrk(args.port, clients, args.seconds, photos, server)
                for _ in range(args.rounds)]  # fmt: skip
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()


def row(handoffs: int, busy: bool, clients: int, runs: list[dict]) -> str:
    mean = {k: sum(r[k] for r in runs) / len(runs)
            for k in ("rps", "loop_ms", "work_ms", "client_ms", "busy")}  # fmt: skip
    return (f"{handoffs:<11}{'busy' if busy else 'idle':<8}{clients:>7}{mean['rps']:>9.1f}"
            f"{mean['loop_ms']:>9.3f}{mean['work_ms']:>12.3f}{mean['client_ms']:>8.3f}"
            f"{mean['busy']:>10.0%}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--service-ms",
        type=float,
        default=6.0,
        help="simulated time per request (about the model's CPU time per image)",
    )
    p.add_argument("--slots", type=int, default=2, help="requests served at once (the cores)")
    p.add_argument(
        "--handoffs",
        default="0,2",
        help="thread-pool turns per request, one server each (the service makes 2: decode, "
        "inference)",
    )
    p.add_argument("--port", type=int, default=8766)
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    photos = photo_files(args.photos, 64)
    print(f"uvicorn with a bare ASGI app: reads the body, waits {args.service_ms:g} ms "
          f"({args.slots} at a time; with hand-offs, sleeping in that many turns on a thread "
          f"pool), answers {len(ANSWER)} bytes of JSON; wrk -t1 with {len(photos)} real JPEG "
          f"photos; {os.cpu_count()} CPUs; {args.rounds} rounds of {args.seconds} s per "
          "row\n")  # fmt: skip
    print(f"{'hand-offs':<11}{'cores':<8}{'clients':>7}{'req/s':>9}{'loop ms':>9}"
          f"{'threads ms':>12}{'wrk ms':>8}{'CPU busy':>10}")  # fmt: skip
    for handoffs in (int(h) for h in args.handoffs.split(",")):
        env = {"FLOOR_SERVICE_MS": str(args.service_ms), "FLOOR_SLOTS": str(args.slots),
               "FLOOR_HANDOFFS": str(handoffs)}  # fmt: skip
        server = start_server(args.port, env, app="bench.http_floor:app")
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                for busy in (False, True):
                    runs = measure(args, clients, busy, photos, server.pid)
                    print(row(handoffs, busy, clients, runs), flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
