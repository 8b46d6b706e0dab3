"""Debian's headless Chromium driven by Playwright, for the WebUI tests.

The host's web UI loads Alpine.js, htmx, Bootstrap, Font Awesome and three small libraries from
public CDNs (``templates/base_htmx.html`` and ``templates/trainer_htmx.html`` in SimpleTuner
4.10.1). This machine's network is closed, so the browser is served the same npm packages,
installed by ``tools/browser.sh`` under ``tools/webui-assets/`` at the versions those templates
name; any other outside request is refused and recorded, so a test can show it needed none.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
ASSETS = REPO / "tools" / "webui-assets" / "node_modules"
SETUP = "tools/browser.sh"
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# machine's closed network refuses; a fresh profile keeps runs independent.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

_NPM_CDN = re.compile(r"https://(?:unpkg\.com|cdn\.jsdelivr\.net/npm)/((?:@[^/@]+/)?[^/@]+)@[^/]+/(.+)")
_FONT_AWESOME_CDN = re.compile(r"https://cdnjs\.cloudflare\.com/ajax/libs/font-awesome/[^/]+/(.+)")
_OUTSIDE = re.compile(r"^https?://(?!127\.0\.0\.1[:/])")


def cdn_file(url: str) -> Path | None:
    """The local copy of a CDN file the host's templates load, or None for any other address."""
    url = url.split("?", 1)[0].split("#", 1)[0]
    if match := _NPM_CDN.match(url):
        return ASSETS / match.group(1) / match.group(2)
    if match := _FONT_AWESOME_CDN.match(url):
        return ASSETS / "@fortawesome" / "fontawesome-free" / match.group(1)
    return None


def missing_setup() -> str | None:
    """Why the browser cannot run here, naming the fix, or None when it can."""
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing: run {SETUP} (installs Debian's chromium and chromium-driver)"
    if not (ASSETS / "alpinejs").is_dir():
        return f"{ASSETS} is missing: run {SETUP} (installs the web UI's npm packages)"
    return None


@dataclass
class BrowserLog:
    """What the page asked for outside 127.0.0.1 and could not get, and its uncaught errors."""

    refused: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)


@contextmanager
def chromium_page(profile: Path, *, width: int = 1400, height: int = 1000) -> Iterator[tuple[object, BrowserLog]]:
    """A page in a fresh headless Chromium whose CDN requests are served from the local copies."""
    from playwright.sync_api import sync_playwright

    problem = missing_setup()
    if problem:
        raise RuntimeError(problem)
    log = BrowserLog()

    def route(request_route) -> None:
        local = cdn_file(request_route.request.url)
        if local is not None and local.is_file():
            content_type = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
            request_route.fulfill(path=str(local), content_type=content_type)
        else:
            log.refused.append(request_route.request.url)
            request_route.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": width, "height": height},
        )
        try:
            context.route(_OUTSIDE, route)
            page = context.new_page()
            page.on("pageerror", lambda error: log.page_errors.append(str(error)))
            yield page, log
        finally:
            context.close()
