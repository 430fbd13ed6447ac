"""`python -m app`: serve the model with as many uvicorn processes as the host's CPUs call for.

    python -m app                               # the shipped model on http://127.0.0.1:8000
    MOBILEVIT_HOST=0.0.0.0 PORT=8080 python -m app

The shape (processes, inference workers, threads, decode threads) comes from `app.topology`;
settings from `MOBILEVIT_*` variables (`app.settings`). With more than one process, their
/metrics are summed through a directory of this instance's own (PROMETHEUS_MULTIPROC_DIR, a new
temporary directory unless set), emptied at start and removed at exit, so two services on one
host never share or add up each other's counts. A PROMETHEUS_MULTIPROC_DIR that is set is emptied
at start with any number of processes, so a restart never adds up the runs before it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import uvicorn

from app.metrics import clear_directory
from app.settings import Settings


def main() -> None:
    settings = Settings()
    topology = settings.topology()
    created = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # one process too: it reads the files
        clear_directory(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    elif topology.processes > 1:
        created = tempfile.mkdtemp(prefix=f"mobilevit-metrics-{settings.port}-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = created
    try:
        uvicorn.run(
            "app.main:app",
            host=settings.host,
            port=settings.port,
            workers=topology.processes,
            access_log=settings.access_log,
            # Past the request deadline nothing in flight can still succeed.
            timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        )
    finally:
        if created:
            shutil.rmtree(created, ignore_errors=True)


if __name__ == "__main__":
    main()
