"""The interactive API docs (Swagger UI at ``/docs``, ReDoc at ``/redoc``) served offline.

FastAPI's own docs pages load their JavaScript and CSS from a CDN, which a service on a closed
network cannot reach. These pages use the same FastAPI page builders but point at copies of the
assets shipped in the ``fastapi-offline`` package (Swagger UI is Apache-2.0, ReDoc MIT; the
package's licence file names both), served by this process under :data:`DOCS_ASSETS_PREFIX`.
Access to the pages and the assets follows the ``docs_access`` setting like ``/openapi.json``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse

from omnipose.service.auth import DOCS_ASSETS_PREFIX

SWAGGER_JS = "swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui.css"
REDOC_JS = "redoc.standalone.js"
FAVICON = "favicon.png"


def assets_directory() -> Path:
    """The folder of the shipped Swagger UI, ReDoc and favicon files."""
    return Path(str(files("fastapi_offline") / "static"))


def mount_docs(app: FastAPI) -> None:
    """Serve ``/docs``, ``/docs/oauth2-redirect`` and ``/redoc`` from local assets.

    ``app`` must be created with ``docs_url=None`` and ``redoc_url=None`` (FastAPI's CDN pages
    off); nothing is mounted when it has no ``openapi_url`` (docs switched off).
    """
    openapi_url = app.openapi_url
    if openapi_url is None:
        return
    directory = assets_directory()
    missing = [name for name in (SWAGGER_JS, SWAGGER_CSS, REDOC_JS, FAVICON)
               if not (directory / name).is_file()]
    if missing:
        raise RuntimeError(f"API docs assets missing from {directory}: {', '.join(missing)}")
    app.mount(DOCS_ASSETS_PREFIX, StaticFiles(directory=directory), name="docs-assets")
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    def asset(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{DOCS_ASSETS_PREFIX}/{name}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=asset(request, SWAGGER_JS),
            swagger_css_url=asset(request, SWAGGER_CSS),
            swagger_favicon_url=asset(request, FAVICON),
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset(request, REDOC_JS),
            redoc_favicon_url=asset(request, FAVICON),
            with_google_fonts=False,
        )
