"""The web console's files and headers, without a browser or Ray (fast).

``create_app`` serves ``/ui/`` with a strict Content-Security-Policy; the page loads only
its own script and stylesheet (no inline script or style, nothing from another origin); the
script never writes API text as HTML; and the files are package data, so an installed
package (what ``setup.py build_py`` copies) has them. ``test_console.py`` drives the page
in a real browser.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from ferrytune.service._api import create_app
from ferrytune.service._console import CONSOLE_FILES, CSP, console_bytes
from ferrytune.service._paths import StateLayout
from ferrytune.service._spec import BaseCatalog
from ferrytune.service._store import JobStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(tmp_path):
    layout = StateLayout(tmp_path / "state")
    layout.root.mkdir()
    store = JobStore.open(layout.default_db_url)
    with TestClient(create_app(store, BaseCatalog({}), layout)) as c:
        yield c


def csp_directives(header: str) -> dict[str, list[str]]:
    parts = (d.split() for d in header.split(";") if d.strip())
    return {p[0]: p[1:] for p in parts}


def test_ui_is_served_with_a_strict_csp(client):
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = csp_directives(page.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert not any("unsafe" in v or "*" in v or ":" in v for values in csp.values() for v in values), csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"

    for name, media_type in (("console.js", "text/javascript"), ("console.css", "text/css")):
        r = client.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media_type)
        assert r.headers["content-security-policy"] == CSP and r.content == console_bytes(name)
    moved = client.get("/ui", follow_redirects=False)
    assert moved.status_code == 308 and moved.headers["location"] == "ui/"
    for path in ("/ui/nope.js", "/ui/..%2Fconsole.js", "/ui/%2e%2e/_api.py"):
        assert client.get(path).status_code == 404, path
    # the console opened nothing: the API still wants a token, and the page is the same without one
    assert client.get("/v1/jobs").status_code == 401
    assert "ftk_" not in page.text.replace("ftk_...", "")


def test_page_loads_only_its_own_files_and_writes_api_text_as_text():
    html = console_bytes("index.html").decode()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts == [(' src="console.js" defer', "")]  # no inline script
    assert re.findall(r'<link\b[^>]*href="([^"]+)"', html) == ["console.css"]
    assert not re.search(r"\sstyle=|<style|\son[a-z]+=|https?://|//cdn", html, re.I)
    code = console_bytes("console.js").decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, sink
    assert "textContent" in code and "sessionStorage" in code and "Authorization" in code
    assert "?token" not in code and "document.cookie" not in code
    assert not re.search(r"https?://", code.replace('"http://www.w3.org/2000/svg"', ""))  # a namespace, not a fetch


def test_package_data_ships_the_console(tmp_path):
    """``build_py`` (what every wheel and install runs) copies the console files with the package."""
    out = tmp_path / "build"
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    built = out / "ferrytune" / "service" / "console"
    assert sorted(p.name for p in built.iterdir()) == sorted(CONSOLE_FILES)
    for name in CONSOLE_FILES:
        assert (built / name).read_bytes() == console_bytes(name)
