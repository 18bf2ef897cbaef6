"""A real headless Chromium driven over the DevTools protocol (websocket-client): enough to load a
page, read it, click like a mouse does, and take a screenshot."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from tests.conftest import wait_until

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # Chromium picks a port and writes it to DevToolsActivePort
)


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on the PATH, if any."""
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


class Chromium:
    """One headless browser with its own profile directory, and a DevTools session on its page."""

    def __init__(self, executable: str, profile: Path, width: int = 1280, height: int = 900) -> None:
        self.profile = profile
        self.log = (profile.parent / "chromium.log").open("w")
        self.process = subprocess.Popen(
            [
                executable,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=self.log,
            stderr=self.log,
        )
        active = profile / "DevToolsActivePort"
        wait_until(
            lambda: (active.is_file() and active.read_text().strip()) or self.process.poll() is not None,
            60,
            0.1,
            what="Chromium's DevToolsActivePort",
        )
        if self.process.poll() is not None:
            raise AssertionError(f"chromium exited with {self.process.returncode}")
        port = int(active.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.loads(response.read())
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self._ids = itertools.count(1)
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events arriving meanwhile are skipped)."""
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                return dict(message.get("result", {}))

    def navigate(self, url: str) -> None:
        """Open `url` and wait until its document has loaded."""
        self.send("Page.navigate", url=url)
        wait_until(lambda: self.evaluate("document.readyState") == "complete", 30, 0.1, what=f"{url} loaded")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """Press and release the left mouse button at the centre of the element (a real click)."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if box is None:
            raise AssertionError(f"nothing on the page matches {selector}")
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        """A PNG of the viewport."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Quit the browser (our process only)."""
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            self.log.close()
