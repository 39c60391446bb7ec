"""A self-contained page to browse a run's latents, and a headless-browser screenshot of it.

    python -m latents.features RUN_DIR                  # writes RUN_DIR/features.html (through write_page)
    python -m latents.page RUN_DIR/features.html --screenshot shot.png [--latent 12]

`write_page(features, path, judged)` writes one static HTML file: the features.json data (latents/features.py) and,
when latents/judge.py has run, the judge's explanations and scores, inline in a <script type="application/json">
block, with the CSS (page.css) and the script that renders them (page.js), read from the files beside this one. No server, no network, no external file.

The page: a list of the latents of one dictionary (a selector switches between the dictionaries of a
per-layer set), sortable by clicking a column (density, max activation, FC, judge score) and filtered by
ranges of those and by a search over each latent's top tokens (the tokens at its top examples' peaks),
promoted tokens and explanation. Clicking a latent opens its card: the numbers, the judge's explanation,
the per-layer bars (Δ_l of the functional-coherence computation and the decoder norms, for crosscoders),
the activation histogram (log-spaced bins), the promoted and suppressed tokens (the logit lens, and with
features.py --intervene those of the latent's ablation in its top contexts), PolySAE's interaction
partners (clickable), and the top and quantile-band examples with each token's background intensity
proportional to its activation (hover a token for the value).

`Browser` is a minimal W3C WebDriver client over chromedriver's JSON-over-HTTP protocol (urllib only),
used by `screenshot` and by tests/test_features.py to check the page in headless Chromium (Debian's
`chromium` and `chromium-driver` packages). The flags keep Chromium off the network.
"""
from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from support.files import json_text

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

HERE = Path(__file__).resolve().parent
LIST_ROWS = 400                                           # rows of the latent list (page.js); every latent has a card
CSS = (HERE / "page.css").read_text(encoding="utf-8")     # the page's style
SCRIPT = (HERE / "page.js").read_text(encoding="utf-8")   # renders the list and the cards from the JSON

BODY = """<header><b id="title"></b> <span id="info" class="muted"></span></header>
<div id="filters"><select id="dict"></select><input id="search" placeholder="search top tokens, promoted tokens, explanations" size="40">
density <input id="dmin" type="number" step="any" placeholder="min"><input id="dmax" type="number" step="any" placeholder="max">
max act ≥ <input id="amin" type="number" step="any">
<span id="fcf">FC <input id="fmin" type="number" step="any" placeholder="min"><input id="fmax" type="number" step="any" placeholder="max"></span>
<label><input id="dead" type="checkbox"> dead latents</label> <span id="count" class="muted"></span></div>
<div id="main"><div id="side"><table id="latents"></table></div><div id="card"><p class="muted">click a latent</p></div></div>"""


def write_page(features: dict, path, judged: dict | None = None) -> None:
    """Write the page for features.json's dict; judged: {dictionary name: {latent id: {"explanation",
    "accuracy", "f1"}}} from autointerp.py, or None."""
    data = json_text({"features": features, "judged": judged or {}}, separators=(",", ":")).replace("<", "\\u003c")
    html = (f'<!doctype html><html><head><meta charset="utf-8"><title>latents of {Path(features["run"]).name}</title>'
            f'<style>{CSS}</style></head><body>{BODY}\n<script type="application/json" id="data">{data}</script>\n'
            f'<script>{SCRIPT}</script></body></html>\n')
    Path(path).write_text(html, encoding="utf-8")


# ----------------------------------------------------------------------------------------
# Headless Chromium through chromedriver (W3C WebDriver, JSON over HTTP)
# ----------------------------------------------------------------------------------------


class Browser:
    """One headless Chromium session: get(url), find(css), click(element), text(element), run(js),
    screenshot(). Use as a context manager; it starts and stops its own chromedriver."""

    def __init__(self, chromium: str = "/usr/bin/chromium", chromedriver: str = "/usr/bin/chromedriver",
                 size=(1400, 900), startup_s: float = 60.0):
        for exe in (chromium, chromedriver):
            if not Path(exe).exists():
                raise FileNotFoundError(f"{exe} not found: apt-get install chromium chromium-driver")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        self.proc = subprocess.Popen([chromedriver, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + startup_s
        while not self._ready():
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"chromedriver did not start on port {self.port}")
            time.sleep(0.1)
        args = CHROMIUM_FLAGS + [f"--user-data-dir={self.profile.name}", f"--window-size={size[0]},{size[1]}"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": chromium, "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _ready(self) -> bool:
        try:
            return bool(self._call("GET", "/status").get("ready"))
        except (urllib.error.URLError, ConnectionError):
            return False

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.read().decode(errors='replace')[:300]}") from None

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def get(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def find(self, css: str) -> list[str]:
        found = self._call("POST", self._s("/elements"), {"using": "css selector", "value": css})
        return [next(iter(e.values())) for e in found]

    def click(self, element: str) -> None:
        self._call("POST", self._s(f"/element/{element}/click"), {})

    def text(self, element: str) -> str:
        return self._call("GET", self._s(f"/element/{element}/text"))

    def run(self, script: str, *args):
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def screenshot(self) -> bytes:
        return base64.b64decode(self._call("GET", self._s("/screenshot")))

    def close(self) -> None:
        try:
            if getattr(self, "session", None):
                self._call("DELETE", self._s(""))
        finally:
            self.proc.terminate()
            self.proc.wait()
            self.profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def screenshot(page, png, latent: int | None = None, size=(1400, 900)) -> str:
    """Open the page in headless Chromium, open latent `latent`'s card (default: the first row's), save a PNG;
    returns the card's title ("latent N").
    The list shows the first LIST_ROWS latents of its order; any other latent of the first dictionary (dead
    ones included) is opened through the page's own `show`. ValueError for an id the page does not hold."""
    with Browser(size=size) as b:
        b.get(Path(page).resolve().as_uri())
        rows = b.find(f'#latents tbody tr[data-id="{latent}"]' if latent is not None else "#latents tbody tr")
        if rows:
            b.click(rows[0])
        elif latent is None:
            raise ValueError(f"{page} lists no latent")
        else:
            name, n = b.run("const d = F.dictionaries[0]; return [d.name, d.latents.length];")
            if not 0 <= latent < n:
                raise ValueError(f"no latent {latent} in {page}: its dictionary ({name}) has latents 0 to {n - 1}")
            b.run("show(arguments[0]);", latent)      # in features.json, beyond the rows the list shows
        Path(png).write_bytes(b.screenshot())
        return b.run("const h = document.querySelector('#card h2'); return h ? h.textContent : '';")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("page", help="a features.html written by features.py")
    p.add_argument("--screenshot", required=True, help="PNG to write")
    p.add_argument("--latent", type=int, default=None, help="latent to open (default: the first listed)")
    p.add_argument("--size", default="1400x900", help="window size WxH")
    a = p.parse_args(argv)
    try:
        screenshot(a.page, a.screenshot, a.latent, tuple(int(v) for v in a.size.split("x")))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
