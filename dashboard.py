"""A self-contained page to browse a run's latents, and a headless-browser screenshot of it.

    python features.py RUN_DIR                          # writes RUN_DIR/features.html (through write_page)
    python dashboard.py RUN_DIR/features.html --screenshot shot.png [--latent 12]

`write_page(features, path, judged)` writes one static HTML file: the features.json data (features.py) and,
when autointerp.py has run, the judge's explanations and scores, inline in a <script type="application/json">
block, with the CSS and the script that renders them. No server, no network, no external file.

The page: a list of the latents of one dictionary (a selector switches between the dictionaries of a
per-layer set), sortable by clicking a column (density, max activation, FC, judge score) and filtered by
ranges of those and by a search over each latent's top tokens (the tokens at its top examples' peaks),
promoted tokens and explanation. Clicking a latent opens its card: the numbers, the judge's explanation,
the per-layer bars (Δ_l of the functional-coherence computation and the decoder norms, for crosscoders),
the activation histogram (log-spaced bins), the promoted and suppressed tokens, PolySAE's interaction
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

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#222}
header{padding:8px 12px;background:#f3f3f3;border-bottom:1px solid #ddd}
header b{font-size:15px}
#main{display:flex;height:calc(100vh - 90px)}
#side{width:44%;overflow:auto;border-right:1px solid #ddd;padding:0 6px 6px}
#card{flex:1;overflow:auto;padding:8px 14px}
#filters{display:flex;flex-wrap:wrap;gap:6px;padding:6px 12px;border-bottom:1px solid #ddd}
#filters input[type=number]{width:70px}
table{border-collapse:collapse;width:100%}
th{cursor:pointer;text-align:left;background:#fafafa;position:sticky;top:0}
td,th{padding:2px 6px;border-bottom:1px solid #eee;white-space:nowrap}
td.tt{white-space:normal;font-family:monospace}
tr:hover{background:#f0f6ff;cursor:pointer}
tr.sel{background:#dcebff}
.ex{font-family:monospace;margin:2px 0;padding:2px 4px;border-left:3px solid #eee;white-space:pre-wrap;word-break:break-all}
.ex .a{color:#888;display:inline-block;width:52px}
.tok{border-radius:2px}
.peak{outline:1px solid #c40}
.sp{color:#aaa}
.chip{display:inline-block;font-family:monospace;background:#eef;margin:1px;padding:0 3px;border-radius:3px}
.neg{background:#fee}
.muted{color:#888}
h3{margin:10px 0 4px;font-size:14px}
h2{margin:4px 0}
.row{display:flex;gap:16px}
.col{flex:1;min-width:0}
.col.wide{flex:2}
svg text{font-size:10px;fill:#555}
"""

SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const F = D.features, J = D.judged || {}, V = F.vocab, SPECIAL = new Set(F.special_ids);
let di = 0, sortKey = 'max_act', sortDir = -1, selected = null;
const $ = id => document.getElementById(id);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) k === 'text' ? e.textContent = v : e.setAttribute(k, v);
  for (const k of kids) if (k != null) e.append(k);
  return e;
}
const fmt = v => v == null ? '–' : (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(2));
const tokText = id => id < 0 ? null : SPECIAL.has(id) ? '¶' : (V[id] ?? '?').replace(/\n/g, '↵');
function dict() { return F.dictionaries[di]; }
function judged(id) { return (J[dict().name] || {})[id]; }
function topTokens(r) {
  const count = {};
  for (const e of r.top || []) { const t = tokText(e.tokens[e.peak]); if (t) count[t] = (count[t] || 0) + 1; }
  return Object.entries(count).sort((a, b) => b[1] - a[1]).slice(0, 4).map(x => x[0]);
}
function value(r, key) {
  if (key === 'judge') { const j = judged(r.id); return j ? j.accuracy : null; }
  return r[key];
}
function num(id) { const v = parseFloat($(id).value); return isNaN(v) ? null : v; }
function rows() {
  const q = $('search').value.toLowerCase(), dead = $('dead').checked;
  const lim = {density: [num('dmin'), num('dmax')], max_act: [num('amin'), null], fc: [num('fmin'), num('fmax')]};
  return dict().latents.filter(r => {
    if (!dead && !r.fires) return false;
    for (const [k, [lo, hi]] of Object.entries(lim)) {
      const v = r[k];
      if ((lo != null || hi != null) && v == null) return false;
      if (lo != null && v < lo) return false;
      if (hi != null && v > hi) return false;
    }
    if (!q) return true;
    const j = judged(r.id);
    const hay = r._top.join(' ') + ' ' + r.promoted.map(p => tokText(p[0])).join(' ') + ' ' + (j ? j.explanation : '');
    return hay.toLowerCase().includes(q);
  }).sort((a, b) => {
    const x = value(a, sortKey), y = value(b, sortKey);
    if (x == null) return 1; if (y == null) return -1;
    return sortDir * (x - y) || a.id - b.id;
  });
}
function renderList() {
  const d = dict(), multi = d.latents.some(r => r.fc !== undefined), hasJ = !!J[d.name];
  $('fcf').style.display = multi ? '' : 'none';
  const cols = [['id', '#'], ['density', 'density'], ['max_act', 'max act']];
  if (multi) cols.push(['fc', 'FC']);
  if (hasJ) cols.push(['judge', 'judge']);
  const head = el('tr', {}, ...cols.map(([k, t]) => {
    const th = el('th', {'data-key': k, text: t + (k === sortKey ? (sortDir < 0 ? ' ▼' : ' ▲') : '')});
    th.onclick = () => { sortDir = k === sortKey ? -sortDir : -1; sortKey = k; renderList(); };
    return th;
  }), el('th', {text: 'top tokens'}));
  const all = rows(), shown = all.slice(0, 400);
  const body = el('tbody', {}, ...shown.map(r => {
    const tr = el('tr', {'data-id': r.id, class: r.id === selected ? 'sel' : ''},
      ...cols.map(([k]) => el('td', {text: k === 'id' ? r.id : fmt(value(r, k))})),
      el('td', {class: 'tt', text: r._top.join(' · ')}));
    tr.onclick = () => show(r.id);
    return tr;
  }));
  $('latents').replaceChildren(el('thead', {}, head), body);
  $('count').textContent = `${shown.length} shown of ${all.length} matching (${d.alive} of ${d.n_latents} latents fire)`;
}
function bars(values, labels, w, h, color) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${h + 14}`); svg.setAttribute('style', `width:100%;max-width:${w}px`);
  const max = Math.max(...values, 1e-12), bw = w / values.length;
  values.forEach((v, i) => {
    const r = document.createElementNS(svg.namespaceURI, 'rect'), bh = h * v / max;
    for (const [k, x] of Object.entries({x: i * bw + 1, y: h - bh, width: Math.max(bw - 2, 1), height: bh, fill: color})) r.setAttribute(k, x);
    const t = document.createElementNS(svg.namespaceURI, 'title'); t.textContent = `${labels[i]}: ${fmt(v)}`; r.append(t);
    svg.append(r);
    if ((labels.length <= 10 || i % Math.ceil(labels.length / 5) === 0) && i * bw < w - 24) {
      const tx = document.createElementNS(svg.namespaceURI, 'text');
      tx.setAttribute('x', i * bw + 1); tx.setAttribute('y', h + 12); tx.textContent = labels[i]; svg.append(tx);
    }
  });
  return svg;
}
function example(e, max) {
  const div = el('div', {class: 'ex'}, el('span', {class: 'a', text: fmt(e.act)}));
  e.tokens.forEach((id, i) => {
    const t = tokText(id); if (t == null) return;
    const a = e.acts[i], span = el('span', {class: 'tok' + (SPECIAL.has(id) ? ' sp' : '') + (i === e.peak ? ' peak' : ''), text: t, title: fmt(a)});
    if (a > 0) span.style.background = `rgba(255,120,0,${Math.min(1, a / max).toFixed(3)})`;
    div.append(span);
  });
  return div;
}
function chips(list, cls) { return el('div', {}, ...list.map(([id, v]) => el('span', {class: 'chip ' + cls, title: fmt(v), text: tokText(id)}))); }
function show(id) {
  selected = id;
  const d = dict(), r = d.latents[id], j = judged(id), c = $('card');
  const ctx = el('div', {class: 'col wide'}), side = el('div', {class: 'col'});
  c.replaceChildren(el('h2', {text: `latent ${id}`}), el('div', {class: 'muted', text: `${d.name} · ${d.kind}`}),
    el('p', {text: `density ${fmt(r.density)} (${r.fires} of ${F.tokens} tokens) · max ${fmt(r.max_act)} · mean ${fmt(r.mean_act)}` + (r.fc !== undefined ? ` · FC ${fmt(r.fc)}` : '')}));
  if (j) c.append(el('p', {}, el('b', {text: 'judge: '}), `“${j.explanation}” · detection accuracy ${fmt(j.accuracy)}, F1 ${fmt(j.f1)}`));
  c.append(el('div', {class: 'row'}, ctx, side));
  if (!r.fires) ctx.append(el('p', {class: 'muted', text: 'this latent never fired on the held-out tokens read'}));
  if (r.top) ctx.append(el('h3', {text: `top ${r.top.length} contexts`}), ...r.top.map(e => example(e, r.max_act)));
  for (const b of r.quantiles || []) if (b.examples.length)
    ctx.append(el('h3', {text: `quantile band ${b.band} of ${b.of} (window max ${fmt(b.range[0])}–${fmt(b.range[1])})`}), ...b.examples.map(e => example(e, r.max_act)));
  const L = d.layers.map(String);
  if (r.layer_delta) side.append(el('h3', {text: 'Δ_l: change when layer l is zeroed'}), bars(r.layer_delta, L, 240, 50, '#4a7'));
  if (r.decoder_norms) side.append(el('h3', {text: 'decoder norm per layer'}), bars(r.decoder_norms, L, 240, 50, '#47a'));
  if (r.hist) {   // the bins from the first to the last non-empty one
    const lo = Math.max(0, r.hist.findIndex(v => v > 0) - 1), hi = Math.min(r.hist.length, r.hist.length - [...r.hist].reverse().findIndex(v => v > 0) + 1);
    side.append(el('h3', {text: 'activations (log-spaced bins)'}), bars(r.hist.slice(lo, hi), F.hist_edges.slice(lo, hi).map(fmt), 240, 50, '#e80'));
  }
  side.append(el('h3', {text: 'promoted tokens (logit lens)'}), chips(r.promoted, ''), el('h3', {text: 'suppressed tokens'}), chips(r.suppressed, 'neg'));
  if (r.partners) {
    side.append(el('h3', {text: 'interacts most with (‖Θ2‖)'}));
    const p = el('div');
    for (const [k, w] of r.partners) { const a = el('a', {href: '#', text: `${k} (${fmt(w)})`}); a.onclick = ev => { ev.preventDefault(); show(k); }; p.append(a, ' '); }
    side.append(p);
  }
  renderList();
}
function init() {
  $('title').textContent = F.run;
  $('info').textContent = `${F.model} · ${F.tokens.toLocaleString()} held-out tokens (${F.text})`;
  for (const d of F.dictionaries) for (const r of d.latents) r._top = topTokens(r);
  $('dict').replaceChildren(...F.dictionaries.map((d, i) => el('option', {value: i, text: `${d.name} (${d.kind})`})));
  $('dict').onchange = () => { di = +$('dict').value; selected = null; $('card').replaceChildren(); renderList(); };
  for (const id of ['search', 'dmin', 'dmax', 'amin', 'fmin', 'fmax', 'dead']) $(id).oninput = renderList;
  renderList();
}
init();
"""

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
    data = json.dumps({"features": features, "judged": judged or {}}, separators=(",", ":")).replace("<", "\\u003c")
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


def screenshot(page, png, latent: int | None = None, size=(1400, 900)) -> None:
    """Open the page in headless Chromium, click latent `latent` (default: the first row), save a PNG."""
    with Browser(size=size) as b:
        b.get(Path(page).resolve().as_uri())
        rows = b.find(f'#latents tbody tr[data-id="{latent}"]' if latent is not None else "#latents tbody tr")
        if not rows:
            raise ValueError(f"no latent {latent} in the list of {page}" if latent is not None else f"{page} lists no latent")
        b.click(rows[0])
        Path(png).write_bytes(b.screenshot())


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
