"""The web console at ``/ui/``: static HTML + JS + CSS from ``ferrytune/service/console/``.

No build step and nothing from elsewhere: the three files ship as package data and are read
once, when the app is built (a package installed without them fails at start, not at the
first visit). The page talks to the tenant-scoped ``/v1/`` routes with ``fetch()``, sending
the token the tenant pastes as the ``Authorization`` header; the token is never in a URL or
a cookie, so these routes need no authentication and hold nothing secret.

Every console response carries a strict Content-Security-Policy (scripts and styles only
from these files, no inline script, no framing, requests only to this origin), so even a
page bug that put a tenant's text in as HTML could not run it.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, HTTPException
from fastapi.responses import RedirectResponse, Response

__all__ = ["CONSOLE_FILES", "CONSOLE_HEADERS", "CSP", "console_bytes", "mount_console"]

CONSOLE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
"""The console's files (in ``ferrytune/service/console/``) and their media types; nothing else is served."""

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

CONSOLE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def console_bytes(name: str) -> bytes:
    """One of the console's files, as installed with the package."""
    return (resources.files("ferrytune.service") / "console" / name).read_bytes()


def mount_console(app: FastAPI, prefix: str = "/ui") -> None:
    """Serve the console under ``prefix`` + ``/`` on ``app``."""
    files = {name: console_bytes(name) for name in CONSOLE_FILES}

    def serve(name: str) -> Response:
        return Response(files[name], media_type=CONSOLE_FILES[name], headers=CONSOLE_HEADERS)

    @app.get(prefix, include_in_schema=False)
    def console_slash() -> RedirectResponse:
        # relative, so that it also holds behind a proxy that adds a path prefix
        return RedirectResponse(prefix.rsplit("/", 1)[-1] + "/", status_code=308, headers=CONSOLE_HEADERS)

    @app.get(prefix + "/", include_in_schema=False)
    def console_index() -> Response:
        return serve("index.html")

    @app.get(prefix + "/{name}", include_in_schema=False)
    def console_file(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, f"no console file {name!r}", headers=CONSOLE_HEADERS)
        return serve(name)
