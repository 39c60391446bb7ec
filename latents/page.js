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
    const promoted = r.promoted.concat(r.intervention ? r.intervention.promoted : []);
    const hay = r._top.join(' ') + ' ' + promoted.map(p => tokText(p[0])).join(' ') + ' ' + (j ? j.explanation : '');
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
  $('count').textContent = `${shown.length} shown of ${all.length} matching (${d.alive} of ${d.n_latents} latents fire)` +
    (shown.length < all.length ? ': sort, filter or search to list others' : '');
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
  const iv = r.intervention;   // features.py --intervene: the latent ablated in its top contexts
  if (iv) side.append(el('h3', {class: 'iv', text: `promoted where it fires (ablated in ${iv.contexts} top context${iv.contexts > 1 ? 's' : ''})`}),
    chips(iv.promoted, ''), el('h3', {text: 'suppressed where it fires'}), chips(iv.suppressed, 'neg'),
    el('div', {class: 'muted', text: `KL(clean || ablated) at the peak: ${fmt(iv.kl)} nats`}));
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
