"""Memory under a burst of large uploads, with and without the upload budget.

    python -m bench.upload_burst --clients 200

Starts one `uvicorn app.main:app` process and opens `--clients` connections at once. Each
declares a 9 MiB image body, sends all of it but the last byte, and holds: the worst case for
a service that buffers bodies, as slow clients on a bad network would cause. Prints the server's
resident memory before and while held, and what the clients got back within a few seconds
(held: no answer yet, their body still buffered). Run once with the default budget
(MAX_INFLIGHT_UPLOAD_BYTES, 256 MiB) and once with it out of the way (1 TB).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
from pathlib import Path

from bench.serve import ROOT, start_server

BODY = 9 * 2**20
UNBOUNDED = 10**12


def rss_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


async def held_upload(port: int, answers: list[str], release: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {BODY}\r\n\r\n".encode()
    )
    piece = b"\xff" * 2**20
    try:
        for k in range(BODY // len(piece)):
            writer.write(piece if k < BODY // len(piece) - 1 else piece[:-1])
            await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 3)
        answers.append(line.decode().split(" ", 2)[1] if line else "closed")
    except TimeoutError:
        answers.append("held")
    except ConnectionError:
        answers.append("reset")
    await release.wait()
    writer.close()


async def burst(port: int, pid: int, clients: int) -> tuple[int, collections.Counter]:
    answers: list[str] = []
    release = asyncio.Event()
    tasks = [asyncio.create_task(held_upload(port, answers, release)) for _ in range(clients)]
    async with asyncio.timeout(120):
        while len(answers) < clients:
            await asyncio.sleep(0.2)
    held = rss_mib(pid)
    release.set()
    await asyncio.gather(*tasks)
    return held, collections.Counter(answers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models/flowers-mobilevit-xxs")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    print(f"1 server process, {args.clients} clients each holding a 9 MiB body (all but its last "
          f"byte sent)\n")  # fmt: skip
    print(f"{'budget':<22}{'RSS idle MiB':>13}{'RSS held MiB':>13}  answers")
    for name, budget in (("256 MiB (default)", None), ("none (1 TB)", UNBOUNDED)):
        env = {"MOBILEVIT_MODEL_DIR": str(args.model.resolve())}
        if budget:
            env["MOBILEVIT_MAX_INFLIGHT_UPLOAD_BYTES"] = str(budget)
        server = start_server(args.port, env)
        try:
            idle = rss_mib(server.pid)
            held, answers = asyncio.run(burst(args.port, server.pid, args.clients))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        shown = ", ".join(f"{count} {answer}" for answer, count in sorted(answers.items()))
        print(f"{name:<22}{idle:>13}{held:>13}  {shown}", flush=True)
    return 0


if __name__ == "__main__":
    if not os.path.exists("/proc/self/status"):
        raise SystemExit("needs Linux /proc to read the server's memory")
    raise SystemExit(main())
