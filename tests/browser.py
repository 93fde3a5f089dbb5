"""The dashboard in a real browser: a loopback proxy that adds the token, and headless Chromium.

Ray's dashboard answers its API only with `Authorization: Bearer <token>`; a browser given just a
URL cannot send that header, so the proxy adds it. Used by tests/test_dashboard.py and by
scripts/screenshots.py (the README's pictures).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def token() -> str:
    return (Path.home() / ".ray" / "auth_token").read_text().strip()


@contextmanager
def token_proxy(dashboard: str) -> Iterator[str]:
    """http://127.0.0.1:<port>, forwarding GETs to `dashboard` (host:port) with the token added."""
    secret = token()

    class Forward(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (the name http.server calls)
            request = urllib.request.Request(f"http://{dashboard}{self.path}",
                                             headers={"Authorization": f"Bearer {secret}"})
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    status, headers, body = answer.status, answer.headers, answer.read()
            except urllib.error.HTTPError as e:
                status, headers, body = e.code, e.headers, e.read()
            self.send_response(status)
            for name in ("Content-Type", "Cache-Control"):
                if headers.get(name):
                    self.send_header(name, headers[name])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, *, screenshot: Path | None = None, wait_ms: int = 15000, size: str = "1400,900") -> str:
    """The DOM headless Chromium renders for `url` after `wait_ms` of page time (or a PNG of it)."""
    action = [f"--screenshot={screenshot}", f"--window-size={size}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--virtual-time-budget={wait_ms}", *action, url],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout
