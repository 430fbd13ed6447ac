"""Soak and overload runs against the real service (loopback only, bounded in time).

    python -m bench.soak --model models/flowers-mobilevit-xxs

The server runs as `--mode` of bench.serve: by default "service", what `make serve` and the
Docker image run. Soak: about --requests requests from 32 concurrent wrk clients with real
photos, in slices; prints errors and the resident memory of all the server's processes
together, after warm-up and at the end (growth must stay under 10%). Overload: normal load,
then --overload-clients clients against a small queue (per process) for 20 s (503 +
Retry-After share), then normal load again to show latency recovers.
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from bench.serve import (
    DEFAULT_PHOTOS,
    MODES,
    ROOT,
    photo_files,
    process_tree,
    run_wrk,
    start_server,
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(pid: int) -> tuple[float, int]:
    """Resident memory of the process tree in MB, and how many processes it has."""
    tree = process_tree(pid)
    return sum(rss_mb(member) for member in tree), len(tree)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/flowers-mobilevit-xxs")
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--overload-clients", type=int, default=256)
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--mode", default="service", choices=sorted(set(MODES) - {"peer"}))
    args = p.parse_args(argv)
    photos = photo_files(args.photos, 64)
    env = {**MODES[args.mode], "MOBILEVIT_MODEL_DIR": str(args.model.resolve()),
           "MOBILEVIT_QUEUE_LIMIT": "64"}  # fmt: skip
    server = start_server(args.port, env)
    try:
        warm = run_wrk(args.port, args.clients, 5, photos)
        base_rss, processes = tree_rss_mb(server.pid)
        slice_s = 10
        done, errors, slices = int(warm["rps"] * 5), warm["errors"], []
        while done < args.requests:
            r = run_wrk(args.port, args.clients, slice_s, photos)
            done += int(r["rps"] * slice_s)
            errors += r["errors"]
            slices.append(r)
        end_rss, _ = tree_rss_mb(server.pid)
        print(f"soak: {args.mode} ({processes} processes in the server's tree), {done} requests, "
              f"{args.clients} clients, queue limit 64 per process")  # fmt: skip
        print(f"{'slice':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
        for i, r in enumerate(slices, 1):
            print(f"{i:>6}{r['rps']:>9.1f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['errors']:>8}")
        growth = (end_rss - base_rss) / base_rss
        print(f"errors {errors}; RSS of all processes after warm-up {base_rss:.1f} MB, at end "
              f"{end_rss:.1f} MB ({growth:+.1%})\n")  # fmt: skip

        print(f"overload: {args.clients} clients, then {args.overload_clients} for 20 s, "
              f"then {args.clients} again")  # fmt: skip
        header = f"{'phase':<10}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        print(header + f"{'non-2xx':>9}{'share':>8}")
        for phase, clients, seconds in (("normal", args.clients, 10),
                                        ("overload", args.overload_clients, 20),
                                        ("recovered", args.clients, 10)):  # fmt: skip
            r = run_wrk(args.port, clients, seconds, photos)
            share = r["errors"] / max(1.0, r["rps"] * seconds)
            print(f"{phase:<10}{clients:>8}{r['rps']:>9.1f}{r['p50']:>9.1f}{r['p99']:>9.1f}"
                  f"{r['errors']:>9}{share:>8.1%}")  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
