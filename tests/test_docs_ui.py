"""The API docs pages work offline: every asset they load is served by the service itself."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from omnipose.service.auth import digest
from omnipose.service.engine import PoseEngine
from omnipose.service.metrics import ServiceMetrics
from omnipose.service.rest import create_app
from omnipose.service.settings import ServiceSettings

ASSET_REFERENCE = re.compile(r"""(?:src|href|url)\s*[=:]\s*["']([^"']+)["']""")
KEY = "docs-test-key"


def fetch(paths: list[str], headers: dict[str, str] | None = None,
          **settings: object) -> list[httpx.Response]:
    """GET each path from an in-process app (no model needed: the docs do not touch it)."""
    engine = PoseEngine(ServiceSettings(device="cpu", detector="none", warmup=False, **settings),
                        ServiceMetrics())
    app = create_app(engine)

    async def get_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://omnipose") as client:
            return [await client.get(path, headers=headers) for path in paths]

    return asyncio.run(get_all())


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(page: str) -> None:
    (html,) = fetch([page])
    assert html.status_code == 200
    references = [ref for ref in ASSET_REFERENCE.findall(html.text)
                  if ref != "/openapi.json" and not ref.startswith("#")]
    assert references, html.text
    assert all(ref.startswith("/docs/assets/") for ref in references), references
    assert "//" not in html.text.replace("://omnipose", ""), "no absolute (CDN) URL on the page"
    assets = fetch(references)
    for reference, asset in zip(references, assets, strict=True):
        assert asset.status_code == 200, reference
        assert len(asset.content) > 1000, reference


def test_docs_assets_follow_docs_access() -> None:
    asset = "/docs/assets/swagger-ui.css"
    keys = {"api_key_sha256": digest(KEY)}
    assert [r.status_code for r in fetch(["/docs", asset], **keys)] == [200, 200]
    assert [r.status_code for r in fetch(["/docs", asset], docs_access="auth", **keys)] == [
        401, 401]
    authorised = fetch(["/docs", asset], {"X-API-Key": KEY}, docs_access="auth", **keys)
    assert [r.status_code for r in authorised] == [200, 200]
    assert [r.status_code for r in fetch(["/docs", "/redoc", asset], docs_access="off")] == [
        404, 404, 404]
