"""The demo page at `/`: drop a photo, see what the model thinks (MOBILEVIT_DEMO=false: off).

One HTML page, one stylesheet and one script from app/demo/, no build step and nothing fetched
from elsewhere (the service runs offline). Every answer carries a strict Content-Security-Policy
(scripts and styles from this origin only, no inline script, images from this origin or the
photos' own blob: URLs) and an ETag, with `Cache-Control: no-cache` so a new version shows at
once while an unchanged one costs a 304.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Request, Response

DEMO_DIR = Path(__file__).resolve().parent / "demo"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
#: URL path -> (file in app/demo/, content type).
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/demo/demo.css": ("demo.css", "text/css; charset=utf-8"),
    "/demo/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
}


def _asset_route(body: bytes, media_type: str):
    etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    headers = {
        "Cache-Control": "no-cache",
        "ETag": etag,
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    async def asset(request: Request) -> Response:
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    return asset


def demo_router() -> APIRouter:
    """The page's routes, with the files read once."""
    router = APIRouter(include_in_schema=False)
    for path, (file, media_type) in ASSETS.items():
        router.add_api_route(path, _asset_route((DEMO_DIR / file).read_bytes(), media_type),
                             methods=["GET"])  # fmt: skip
    return router
