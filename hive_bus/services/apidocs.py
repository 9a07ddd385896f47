"""The API reference at ``/schema``: Swagger UI from files the gateway serves itself, never a CDN.

Litestar's render plugins load their scripts from jsDelivr by default; a Pi or a closed network then
shows a blank page. Swagger UI (``swagger-ui-dist`` 5.36.0, Apache-2.0, see
``dashboard/vendor/swagger-ui/LICENSE``) is shipped inside the package and served with the dashboard's
files under ``/dashboard/vendor/``. The OpenAPI document declares the bearer scheme the gateway checks,
so Swagger UI's "Authorize" sends ``Authorization: Bearer <token>`` with every "Try it out". The pages
(``/schema``, ``/schema/swagger``) open without a token (a browser cannot send one to open a page, and
the document holds no data; see :mod:`services.auth`); every call made from them needs one.
"""

from __future__ import annotations

from litestar import get
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.response import Redirect

from hive_bus import __version__

SCHEMA_PATH = "/schema"
DOCS_PATH = "/docs"  # where FastAPI and many other servers keep theirs: a new user tries it first
SWAGGER_ASSETS = "/dashboard/vendor/swagger-ui"
SWAGGER_UI_VERSION = "5.36.0"  # the swagger-ui-dist release in dashboard/vendor/swagger-ui
BEARER = "bearer"


def openapi_config() -> OpenAPIConfig:
    """The gateway's OpenAPI document and the Swagger UI page that renders it from local files."""
    swagger = SwaggerRenderPlugin(
        path=["/", "/swagger"],
        js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
        css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
        standalone_preset_js_url=f"{SWAGGER_ASSETS}/swagger-ui-standalone-preset.js",
        favicon="<link rel='icon' href='data:,'>",  # the default is an image on litestar.dev
    )
    bearer = SecurityScheme(
        type="http",
        scheme="bearer",
        description="A gateway token (HIVE_GATEWAY_TOKENS); needed when the gateway has any.",
    )
    return OpenAPIConfig(
        title="hive-bus gateway",
        version=__version__,
        path=SCHEMA_PATH,
        render_plugins=[swagger],
        components=Components(security_schemes={BEARER: bearer}),
        security=[{BEARER: []}],
    )


@get(DOCS_PATH, include_in_schema=False)
async def docs() -> Redirect:
    """``/docs`` goes to the API reference at ``/schema``."""
    return Redirect(path=SCHEMA_PATH)


__all__ = ["DOCS_PATH", "SCHEMA_PATH", "docs", "openapi_config"]
