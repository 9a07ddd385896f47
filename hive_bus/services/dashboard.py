"""The live dashboard at ``/``: one page, one JavaScript module and a style sheet, served as they are
(no build step) from ``hive_bus/services/dashboard/``.

The page holds no data. Its script reads the JSON API (``/v1/stats``, ``/v1/workers``, ``/v1/tasks``,
``/v1/usage``, ``/v1/problems``, ``/v1/stats/history``, ``/v1/dlq``, a task's ``/timeline``) and the
``/v1/events`` feed, and acts (replay, purge) with the bearer token the user types in when the API asks
for one; so the page and its files are served without a token (see :mod:`services.auth`). Its charts
are drawn by uPlot, shipped in ``dashboard/vendor/`` (see the README there).
"""

# No "from __future__ import annotations" here: Litestar reads the annotations at run time.
from pathlib import Path

from litestar import MediaType, Response, get
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

ASSETS_DIR = Path(__file__).with_name("dashboard")
ASSETS_PATH = "/dashboard"

# The page runs its own script and style only, and talks to this gateway only: task text that were
# ever to reach the page as markup could neither run nor send anything anywhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@get("/", include_in_schema=False, media_type=MediaType.HTML)
async def page() -> Response[bytes]:
    # Read on each request: a few kilobytes, and an edited page shows without a restart.
    return Response((ASSETS_DIR / "index.html").read_bytes(), headers=SECURITY_HEADERS)


async def _secure(response: Response[bytes]) -> Response[bytes]:
    response.headers.update(SECURITY_HEADERS)
    return response


assets = create_static_files_router(
    path=ASSETS_PATH, directories=[ASSETS_DIR], name="dashboard", after_request=_secure
)

ROUTES: list[ControllerRouterHandler] = [page, assets]

__all__ = ["ASSETS_PATH", "ROUTES"]
