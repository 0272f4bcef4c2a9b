"""The service's API page, `/docs`, served from files installed with medx: no CDN.

FastAPI's own page loads Swagger UI's JavaScript and CSS from a CDN, so on a network without
internet (a hospital's often is) it stays blank. Here the page and its assets come from this
process: Swagger UI's distribution files as the `fastapi-offline` package ships them (pinned in
requirements.lock), under /docs/assets/. Swagger UI's online spec validator is switched off:
the page makes no request beyond this server.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

DOCS = "/docs"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
ASSETS = "/docs/assets"
_STATIC = Path(fastapi_offline.__file__).resolve().parent / "static"
_FILES = {  # what the page loads, and nothing else of the folder
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
ASSET_PATHS = frozenset(f"{ASSETS}/{name}" for name in _FILES)  # open without a token


def install_docs(app: FastAPI) -> None:
    """Serve the API page and its assets (create `app` with docs_url=None, redoc_url=None)."""

    @app.get(DOCS, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            oauth2_redirect_url=OAUTH2_REDIRECT,
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no call to validator.swagger.io
        )

    @app.get(OAUTH2_REDIRECT, include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    for name, media_type in _FILES.items():
        app.add_api_route(
            f"{ASSETS}/{name}",
            _asset(_STATIC / name, media_type),
            methods=["GET"],
            include_in_schema=False,
        )


def _asset(path: Path, media_type: str):
    async def asset() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers=CACHE)

    return asset


CACHE = {"Cache-Control": "public, max-age=86400"}
