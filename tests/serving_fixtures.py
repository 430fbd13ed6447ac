"""Serving test fixtures, loaded by the serving test modules with `pytest_plugins`.

One app per format is shared by the whole session (`served`); tests that need other settings
start their own with `serving_helpers.serve()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.serving_helpers import FORMATS, Served, make_settings, serve


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", params=FORMATS)
async def served(request, tiny_model_dir, anyio_backend) -> AsyncIterator[Served]:
    """A running app per format (tflite, savedmodel), shared by the serving tests."""
    async with serve(make_settings(tiny_model_dir, request.param)) as app:
        yield app
