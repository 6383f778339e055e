// llamapool's page: the live pool view, the chat playground and the admin buttons.
//
// Data, all from the router's own API (same origin, relative paths, so the page also works
// behind a proxy that serves it under a prefix):
//   GET  workers               every 1.5 s: the worker table and the tiles
//   GET  metrics               every 1.5 s: Prometheus text; tokens/s, TTFT and ITL are
//                              derived from successive scrapes (rates of counters, deltas of
//                              histogram sums and counts); names that are absent are skipped
//   GET  v1/models             the model's name; with several models, each with its status:
//                              a selector picks the one to chat with and to show, and the
//                              GETs above carry ?model=NAME&autoload=false (looking never loads)
//   POST v1/chat/completions   the playground, stream: true, read with fetch + ReadableStream
//   POST admin/workers/{id}/drain|restart
// Every call sends `Authorization: Bearer <key>` when the key field (kept in localStorage)
// is filled. No framework, no dependency: the charts are SVG drawn here.
'use strict';

const POLL_MS = 1500;
const HIDDEN_POLL_MS = 5000;
const WINDOW_MS = 5 * 60 * 1000; // the charts show the last five minutes
const MIN_SPAN_MS = 30 * 1000; // and at least thirty seconds
const RATE_WINDOW_MS = 6000; // tokens/s is the counter's rise over the last six seconds
const KEY_STORE = 'llamapool.apiKey';
const COLORS = ['#2f6fe4', '#1f9d55', '#d08a1c', '#8b5cf6', '#d64545', '#0ea5a5', '#c0399a', '#5b6b8a'];
const SVG_NS = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);

/** Builds an element: el('td', {class: 'num'}, 'text', child). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null) continue;
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

function fmt(v, digits = 0) {
  if (v == null || !Number.isFinite(v)) return '–';
  return v.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

// ---------------------------------------------------------------------------------------
// API access

function apiKey() {
  return localStorage.getItem(KEY_STORE) || '';
}

function authHeaders(extra) {
  const h = Object.assign({}, extra);
  const key = apiKey();
  if (key) h.Authorization = 'Bearer ' + key;
  return h;
}

/** The error of a non-2xx answer: the OpenAI-shaped message when there is one. */
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    // not JSON: keep the status line
  }
  const e = new Error(message);
  e.status = response.status;
  return e;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    cache: 'no-store',
    headers: authHeaders(options.headers),
  });
  if (!response.ok) throw await errorOf(response);
  return response;
}

// ---------------------------------------------------------------------------------------
// Notices: one line under the header. Polling failures stay until a poll succeeds; action
// results go away after a few seconds.

let noticeTimer = null;
let noticeSource = null;

function notice(text, kind = 'error', source = 'action') {
  const box = $('notice');
  clearTimeout(noticeTimer);
  box.textContent = text;
  box.className = 'notice' + (kind === 'info' ? ' info' : '');
  box.hidden = false;
  noticeSource = source;
  if (source === 'action') noticeTimer = setTimeout(() => clearNotice('action'), 6000);
}

function clearNotice(source) {
  if (noticeSource !== source) return;
  $('notice').hidden = true;
  noticeSource = null;
}

// ---------------------------------------------------------------------------------------
// Prometheus text → numbers

/** Parses the exposition format into {name, labels, value} samples. */
function parseProm(text) {
  const samples = [];
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const m = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[2]) {
      for (const l of m[2].matchAll(/([A-Za-z_]\w*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
      }
    }
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

function workerLabel(labels) {
  const w = labels.worker ?? labels.worker_id ?? labels.worker_index;
  return w == null ? null : String(w);
}

function total(samples, name) {
  let sum = null;
  for (const s of samples) if (s.name === name && Number.isFinite(s.value)) sum = (sum ?? 0) + s.value;
  return sum;
}

/** The first histogram whose name matches one of `patterns` (in order of preference): its
 *  sum and count over all label sets. */
function histogram(samples, patterns) {
  let first = null;
  for (const re of patterns) {
    first = samples.find((s) => s.name.endsWith('_sum') && re.test(s.name));
    if (first) break;
  }
  if (!first) return null;
  const base = first.name.slice(0, -4);
  const sum = total(samples, base + '_sum');
  const count = total(samples, base + '_count');
  if (sum == null || count == null) return null;
  const toMs = /millis|_ms(_|$)/i.test(base) ? 1 : 1000;
  return { name: base, sum, count, toMs };
}

/** What the page uses from one scrape; every field may be null when its metric is absent. */
function readMetrics(samples) {
  const out = {
    predicted: total(samples, 'llamacpp:tokens_predicted_total'),
    predictedSecs: total(samples, 'llamacpp:tokens_predicted_seconds_total'),
    promptSecs: total(samples, 'llamacpp:prompt_seconds_total'),
    requests: total(samples, 'llamacpp:requests_total'),
    perWorker: null,
    perWorkerName: null,
    ttft: histogram(samples, [/time_to_first_token|ttft|first_token/i]),
    itl: histogram(samples, [/inter_token/i, /time_per_output_token|tpot|itl/i]),
  };
  // Generated tokens per worker, if the server exports such a counter.
  const isTokens = (s) =>
    workerLabel(s.labels) != null &&
    s.name.endsWith('_total') &&
    /token/i.test(s.name) &&
    /(predicted|generated|completion|output)/i.test(s.name) &&
    !/(prompt|seconds)/i.test(s.name);
  const first = samples.find(isTokens);
  if (first) {
    out.perWorkerName = first.name;
    out.perWorker = {};
    for (const s of samples) {
      if (s.name !== first.name || !Number.isFinite(s.value)) continue;
      const w = workerLabel(s.labels);
      if (w != null) out.perWorker[w] = (out.perWorker[w] ?? 0) + s.value;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// History: scrapes, and the series the charts draw

const history = {
  scrapes: [], // {t, m: readMetrics(...)}
  series: { tps: {}, ttft: {}, itl: {} }, // chart → label → [{t, v}]
};

function addPoint(chart, label, t, v) {
  if (v == null || !Number.isFinite(v)) return;
  (history.series[chart][label] ??= []).push({ t, v });
}

function prune(now) {
  const cut = now - WINDOW_MS - 10000;
  history.scrapes = history.scrapes.filter((s) => s.t >= cut);
  for (const chart of Object.values(history.series)) {
    for (const label of Object.keys(chart)) {
      chart[label] = chart[label].filter((p) => p.t >= cut);
      if (!chart[label].length) delete chart[label];
    }
  }
}

/** Rise per second of `pick(m)` between the newest scrape and the one ~RATE_WINDOW_MS before. */
function rate(pick) {
  const s = history.scrapes;
  if (s.length < 2) return null;
  const now = s[s.length - 1];
  let old = s[0];
  for (let i = s.length - 2; i >= 0; i--) {
    old = s[i];
    if (now.t - s[i].t >= RATE_WINDOW_MS) break;
  }
  const a = pick(old.m);
  const b = pick(now.m);
  if (a == null || b == null || now.t === old.t) return null;
  if (b < a) return null; // a counter went back: the server restarted
  return ((b - a) * 1000) / (now.t - old.t);
}

/** Mean of `num / den` over the last interval, in ms; null when `den` did not move. */
function intervalMean(pickNum, pickDen, toMs) {
  const s = history.scrapes;
  if (s.length < 2) return null;
  const a = s[s.length - 2].m;
  const b = s[s.length - 1].m;
  const n0 = pickNum(a), n1 = pickNum(b), d0 = pickDen(a), d1 = pickDen(b);
  if ([n0, n1, d0, d1].some((x) => x == null) || d1 <= d0 || n1 < n0) return null;
  return ((n1 - n0) / (d1 - d0)) * toMs;
}

let poolTps = null;
let workerTps = {};
let hasWorkerTps = false; // the Tokens/s column shows only when /metrics has per-worker counters
let sourcesText = '';

function recordScrape(t, m) {
  history.scrapes.push({ t, m });
  prune(t);
  const sources = [];

  // Throughput: per-worker token counters when the server has them (summed for the pool);
  // else a live estimate from the latency histograms' counts; else the pool's counter of
  // finished requests' tokens (which rises only when a request ends).
  workerTps = {};
  hasWorkerTps = m.perWorker != null;
  if (m.perWorker) {
    let sum = 0;
    for (const w of Object.keys(m.perWorker)) {
      const r = rate((x) => (x.perWorker ? x.perWorker[w] ?? null : null));
      workerTps[w] = r;
      if (r != null) {
        sum += r;
        addPoint('tps', `worker ${w}`, t, r);
      }
    }
    poolTps = history.scrapes.length > 1 ? sum : null;
    sources.push(`tokens/s from ${m.perWorkerName}`);
  } else if (m.ttft && m.itl && /inter_token/i.test(m.itl.name)) {
    // Live: each output of a generation (one token per engine step) is one observation of
    // either the first-token or the inter-token histogram.
    poolTps = rate((x) => (x.ttft && x.itl ? x.ttft.count + x.itl.count : null));
    sources.push(`tokens/s ≈ outputs/s (counts of ${m.ttft.name} and ${m.itl.name})`);
  } else {
    poolTps = rate((x) => x.predicted);
    sources.push('tokens/s from llamacpp:tokens_predicted_total (counted when a request finishes)');
  }
  addPoint('tps', 'pool', t, poolTps);

  // Latency: histograms when the server has them, else llama-server's time counters.
  if (m.ttft) {
    addPoint('ttft', 'pool', t, intervalMean((x) => x.ttft?.sum, (x) => x.ttft?.count, m.ttft.toMs));
    sources.push(`TTFT from ${m.ttft.name}`);
  } else {
    addPoint('ttft', 'pool (prefill)', t, intervalMean((x) => x.promptSecs, (x) => x.requests, 1000));
    sources.push('TTFT ≈ prefill time per request (llamacpp:prompt_seconds_total)');
  }
  if (m.itl) {
    addPoint('itl', 'pool', t, intervalMean((x) => x.itl?.sum, (x) => x.itl?.count, m.itl.toMs));
    sources.push(`ITL from ${m.itl.name}`);
  } else {
    addPoint('itl', 'pool', t, intervalMean((x) => x.predictedSecs, (x) => x.predicted, 1000));
    sources.push('ITL ≈ generation time per token (llamacpp:tokens_predicted_seconds_total)');
  }
  sources.push('dots: requests sent from this page');
  sourcesText = sources.join(' · ') + '.';
}

// ---------------------------------------------------------------------------------------
// Charts: a small SVG line chart, redrawn after each poll

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function drawChart(chart) {
  const box = $('chart-' + chart);
  const legend = $('legend-' + chart);
  const width = box.clientWidth || 300;
  const height = box.clientHeight || 120;
  const left = 36, right = 6, top = 6, bottom = 16;
  const now = Date.now();
  // Up to five minutes; less while the page has not been open that long.
  const oldest = history.scrapes.length ? history.scrapes[0].t : now;
  const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, now - oldest));
  const x0 = now - span;
  const labels = Object.keys(history.series[chart]).sort((a, b) => {
    const rank = (l) => (l.startsWith('pool') ? 0 : l === 'this page' ? 2 : 1);
    return rank(a) - rank(b) || a.localeCompare(b, 'en', { numeric: true });
  });
  let max = 0;
  for (const l of labels) for (const p of history.series[chart][l]) if (p.t >= x0) max = Math.max(max, p.v);
  max = niceMax(max);
  const X = (t) => left + ((t - x0) / span) * (width - left - right);
  const Y = (v) => top + (1 - v / max) * (height - top - bottom);

  const root = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img' });
  for (let i = 0; i <= 2; i++) {
    const v = (max * i) / 2;
    root.append(svg('line', { class: 'grid', x1: left, x2: width - right, y1: Y(v), y2: Y(v) }));
    root.append(svg('text', { class: 'axis', x: left - 5, y: Y(v) + 3, 'text-anchor': 'end' }, fmt(v, v < 10 && v % 1 ? 1 : 0)));
  }
  const step = [5e3, 10e3, 15e3, 30e3, 60e3, 120e3, 300e3].find((s) => span / s <= 5) ?? 300e3;
  for (let ago = 0; ago <= span + 1; ago += step) {
    const anchor = ago === 0 ? 'end' : ago + step > span + 1 ? 'start' : 'middle';
    const label = ago === 0 ? 'now' : step < 60e3 ? `-${ago / 1000}s` : `-${ago / 60e3}m`;
    root.append(svg('text', { class: 'axis', x: X(now - ago), y: height - 3, 'text-anchor': anchor }, label));
  }
  legend.replaceChildren();
  let drawn = 0;
  labels.forEach((label) => {
    const color = label === 'this page' ? COLORS[2] : COLORS[labels.indexOf(label) % COLORS.length];
    const points = history.series[chart][label].filter((p) => p.t >= x0);
    if (!points.length) return;
    drawn++;
    const dotsOnly = label === 'this page' || points.length === 1;
    if (!dotsOnly) {
      const d = points.map((p, i) => `${i ? 'L' : 'M'}${X(p.t).toFixed(1)},${Y(p.v).toFixed(1)}`).join('');
      root.append(svg('path', { class: 'line', d, stroke: color }));
    }
    if (dotsOnly || chart !== 'tps') {
      for (const p of points) {
        const dot = svg('circle', { class: 'dot', cx: X(p.t), cy: Y(p.v), r: label === 'this page' ? 3.5 : 2.2, fill: color });
        dot.append(svg('title', {}, `${label}: ${fmt(p.v, p.v < 10 ? 1 : 0)}`));
        root.append(dot);
      }
    }
    const swatch = el('i');
    swatch.style.background = color;
    legend.append(el('span', {}, swatch, label));
  });
  if (!drawn) {
    root.append(svg('text', { class: 'none', x: (left + width) / 2, y: height / 2, 'text-anchor': 'middle' }, 'no data yet'));
  }
  box.replaceChildren(root);
}

function drawCharts() {
  for (const chart of ['tps', 'ttft', 'itl']) drawChart(chart);
  $('sources').textContent = sourcesText;
}

// ---------------------------------------------------------------------------------------
// Workers: table rows updated in place (so a button is never replaced under the pointer)

const rows = new Map(); // id → {tr, cells}
const adminBusy = new Map(); // id → 'drain' | 'restart'
let lastWorkers = [];

const STATE_CLASS = {
  ready: 'pill-ok',
  draining: 'pill-warn',
  starting: 'pill-info',
  restarting: 'pill-info',
  hung: 'pill-bad',
  failed: 'pill-bad',
  stopped: '',
};

function placement(w) {
  const parts = [];
  const gpu = w.gpu ?? w.gpus ?? w.device;
  if (gpu != null && gpu !== '') parts.push(`GPU ${gpu}`);
  if (w.cpus) parts.push(`CPU ${w.cpus}`);
  return parts.join(' · ');
}

/** An adaptive worker's shape now (wide or narrow) and its threads; a fixed worker's threads. */
function shape(w) {
  const threads = w.threads_in_use ?? w.threads;
  const thr = threads != null ? `${threads} thr` : '';
  return w.shape ? `${w.shape} · ${thr}` : thr ? `fixed · ${thr}` : '–';
}

function workerRow(id) {
  if (rows.has(id)) return rows.get(id);
  const c = {
    id: el('td'),
    placement: el('td', { class: 'placement' }),
    shape: el('td', { class: 'c-shape' }),
    state: el('td', { class: 'c-state' }),
    slots: el('td', { class: 'c-slots' }),
    waiting: el('td', { class: 'num c-waiting' }),
    inFlight: el('td', { class: 'num c-inflight' }),
    restarts: el('td', { class: 'num c-restarts' }),
    tps: el('td', { class: 'num c-tps' }),
    actions: el('td', { class: 'actions' }),
  };
  c.drain = el('button', { class: 'small', type: 'button', 'data-action': 'drain', onclick: () => admin(id, 'drain') }, 'Drain');
  c.restart = el('button', { class: 'small', type: 'button', 'data-action': 'restart', onclick: () => admin(id, 'restart') }, 'Restart');
  c.actions.append(c.drain, c.restart);
  const tr = el('tr', { 'data-worker-id': id }, ...Object.values(c).filter((x) => x.tagName === 'TD'));
  const row = { tr, c };
  rows.set(id, row);
  return row;
}

function renderWorkers(workers) {
  lastWorkers = workers;
  const body = $('workers-body');
  $('workers').classList.toggle('no-worker-tps', !hasWorkerTps);
  if (!workers.length) {
    body.replaceChildren(el('tr', { class: 'empty' }, el('td', { colspan: 10 }, 'no workers configured')));
    return;
  }
  const ordered = [];
  for (const w of workers) {
    const { tr, c } = workerRow(w.id);
    c.id.textContent = w.id;
    c.id.title = w.pid != null ? `pid ${w.pid}` : 'no process';
    c.placement.textContent = placement(w);
    c.shape.textContent = shape(w);
    c.shape.title = w.shape_changes != null
      ? `${w.shape_changes} switches between wide${w.wide_threads != null ? ` (${w.wide_threads} threads on CPU ${w.wide_cpus})` : ''} and narrow`
      : 'a fixed worker: its shape does not change';
    const pill = el('span', { class: `pill ${STATE_CLASS[w.state] ?? ''}` }, w.state);
    const busy = adminBusy.get(w.id);
    const parts = [pill];
    if (busy) parts.push(' ', el('span', { class: 'muted small' }, busy === 'drain' ? 'draining…' : 'restarting…'));
    if (w.last_error) parts.push(el('div', { class: 'err' }, w.last_error));
    c.state.replaceChildren(...parts);
    const bar = el('span');
    if (w.running != null && w.slots) bar.style.width = `${Math.min(100, (100 * w.running) / w.slots)}%`;
    c.slots.replaceChildren(
      el('div', { class: 'slots' }, el('span', {}, `${w.running ?? '–'}/${w.slots}`), el('span', { class: 'bar' }, bar)),
    );
    c.waiting.textContent = w.waiting ?? '–';
    c.inFlight.textContent = w.in_flight;
    c.restarts.textContent = w.restarts;
    const tps = workerTps[String(w.id)];
    c.tps.textContent = tps == null ? '–' : fmt(tps, 1);
    c.drain.disabled = busy != null || w.state !== 'ready';
    c.restart.disabled = busy != null || w.state === 'stopped';
    ordered.push(tr);
  }
  body.replaceChildren(...ordered);
}

function renderTiles(workers, metrics) {
  const ready = workers.filter((w) => w.state === 'ready').length;
  const sum = (f) => workers.reduce((a, w) => a + (w[f] ?? 0), 0);
  $('t-ready').textContent = `${ready}/${workers.length}`;
  $('t-slots').textContent = `${sum('running')}/${sum('slots')}`;
  $('t-queue').textContent = sum('waiting');
  $('t-inflight').textContent = sum('in_flight');
  $('t-tps').textContent = fmt(poolTps, 1);
  $('t-requests').textContent = metrics && metrics.requests != null ? fmt(metrics.requests) : '–';
  const health = $('health');
  health.textContent = `${ready}/${workers.length} ready`;
  health.className = 'pill ' + (ready === 0 ? 'pill-bad' : ready < workers.length ? 'pill-warn' : 'pill-ok');
}

// ---------------------------------------------------------------------------------------
// Polling

let modelName = null;
let pollTimer = null;
/** With several models (each listed with a status): their ids and statuses; else empty. */
let models = [];

async function loadModel() {
  try {
    const body = await (await api('v1/models')).json();
    const data = body.data || [];
    models = data.filter((m) => m.status).map((m) => ({ id: m.id, status: m.status.value }));
    const select = $('model-select');
    if (models.length > 1) {
      if (!models.some((m) => m.id === modelName)) {
        const loaded = models.find((m) => m.status === 'loaded');
        modelName = (loaded || models[0]).id;
      }
      select.replaceChildren(...models.map((m) => {
        const option = document.createElement('option');
        option.value = m.id;
        option.textContent = `${m.id} (${m.status})`;
        return option;
      }));
      select.value = modelName;
      select.hidden = false;
      $('model').hidden = true;
    } else {
      modelName = data[0] ? data[0].id : null;
      $('model').textContent = modelName ?? '';
      select.hidden = true;
      $('model').hidden = false;
    }
  } catch (_) {
    // retried at the next poll
  }
}

/** `?model=` for the model-bound GET and admin routes when the router serves several models;
 *  `autoload=false`: looking at a model never loads it (a chat message does). */
function modelQuery() {
  return models.length > 1 && modelName
    ? `?model=${encodeURIComponent(modelName)}&autoload=false`
    : '';
}

async function poll() {
  clearTimeout(pollTimer);
  const t = Date.now();
  const [workers, metrics] = await Promise.allSettled([
    api('workers' + modelQuery()).then((r) => r.json()),
    api('metrics' + (models.length > 1 && modelName ? `?model=${encodeURIComponent(modelName)}` : '')).then((r) => r.text()),
  ]);
  let m = null;
  if (metrics.status === 'fulfilled') {
    m = readMetrics(parseProm(metrics.value));
    recordScrape(t, m);
  }
  if (workers.status === 'fulfilled') {
    const list = workers.value.workers || [];
    renderWorkers(list);
    renderTiles(list, m);
    $('updated').textContent = 'live · ' + new Date(t).toLocaleTimeString('en-GB');
    clearNotice('poll');
    if (modelName == null || models.length > 1) loadModel();
  } else {
    const e = workers.reason;
    const health = $('health');
    if (models.length > 1 && e.status === 400) {
      loadModel();
      renderWorkers([]);
      notice(`${modelName} is not loaded: the first chat message loads it.`, 'info', 'poll');
      health.textContent = 'not loaded';
      health.className = 'pill pill-muted';
    } else if (e.status === 401) {
      notice('This server needs an API key: type it in the field at the top right.', 'info', 'poll');
      health.textContent = 'key needed';
      health.className = 'pill pill-warn';
    } else {
      notice(`Cannot reach the router (${e.message}); retrying.`, 'error', 'poll');
      health.textContent = 'unreachable';
      health.className = 'pill pill-bad';
    }
  }
  drawCharts();
  pollTimer = setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
}

// ---------------------------------------------------------------------------------------
// Admin buttons

async function admin(id, action) {
  const what = action === 'drain'
    ? `Drain worker ${id}? It finishes what it runs and takes no new requests until it is restarted.`
    : `Restart worker ${id}? It is drained, then its process is replaced.`;
  if (!window.confirm(what)) return;
  adminBusy.set(id, action);
  renderWorkers(lastWorkers);
  try {
    // A JSON content type (and the admin header): what the admin routes require of a
    // request, so that no web page of another origin can send one without a preflight.
    await api(`admin/workers/${id}/${action}` + modelQuery(), {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-Llamapool-Admin': '1' },
    });
    notice(`Worker ${id}: ${action === 'drain' ? 'draining' : 'restarted'}.`, 'info');
  } catch (e) {
    notice(`Worker ${id}: ${action} failed: ${e.message}`);
  } finally {
    adminBusy.delete(id);
    poll();
  }
}

// ---------------------------------------------------------------------------------------
// Chat playground

const chat = { history: [], controller: null };

function numberField(id) {
  const raw = $(id).value.trim();
  if (raw === '') return undefined;
  const v = Number(raw);
  return Number.isFinite(v) ? v : undefined;
}

/** Yields the `data:` payload of each SSE event of a response body. */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf = (buf + value).replace(/\r\n/g, '\n');
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = block
          .split('\n')
          .filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(5).replace(/^ /, ''))
          .join('\n');
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** Which worker's in_flight rose between two /workers answers: the one serving us, if only one did. */
function servingWorker(before, after) {
  const was = new Map((before || []).map((w) => [w.id, w.in_flight]));
  const rose = (after || []).filter((w) => w.in_flight > (was.get(w.id) ?? 0));
  return rose.length === 1 ? rose[0].id : null;
}

function setBusy(busy) {
  $('send').disabled = busy;
  $('stop').disabled = !busy;
}

function scrollDown() {
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
}

function addMessage(role, text) {
  const hint = $('messages').querySelector('.hint');
  if (hint) hint.remove();
  const textNode = el('span', { class: 'text' }, text);
  const meta = el('span', { class: 'meta' });
  const node = el('div', { class: `msg msg-${role}` }, textNode);
  if (role === 'assistant') node.append(meta);
  $('messages').append(node);
  scrollDown();
  return { node, textNode, meta };
}

async function send(prompt) {
  chat.history.push({ role: 'user', content: prompt });
  addMessage('user', prompt);
  const view = addMessage('assistant', '');
  view.node.classList.add('streaming');
  view.node.dataset.state = 'streaming';
  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true);
  $('chat-status').textContent = 'waiting for a worker…';

  const body = {
    messages: chat.history.slice(),
    stream: true,
    stream_options: { include_usage: true },
    temperature: numberField('temperature'),
    top_p: numberField('top-p'),
    max_tokens: numberField('max-tokens'),
    seed: numberField('seed'),
  };
  if (modelName) body.model = modelName;

  const s = { text: '', deltas: 0, tFirst: null, tLast: null, finish: null, timings: null, usage: null, worker: null };
  let t0 = performance.now();
  const meta = (final) => {
    const parts = [];
    const n = s.usage ? s.usage.completion_tokens : s.deltas;
    parts.push(`${n} token${n === 1 ? '' : 's'}`);
    let tps = null;
    if (final && s.timings && s.timings.predicted_per_second) tps = s.timings.predicted_per_second;
    else if (s.deltas > 1 && s.tLast > s.tFirst) tps = ((s.deltas - 1) * 1000) / (s.tLast - s.tFirst);
    if (tps != null) parts.push(`${fmt(tps, 1)} tok/s`);
    if (s.tFirst != null) parts.push(`TTFT ${fmt(s.tFirst - t0)} ms`);
    parts.push(s.worker != null ? `worker ${s.worker}` : 'worker ?');
    if (s.finish) parts.push(s.finish);
    view.meta.textContent = parts.join(' · ');
  };
  let state = 'done';
  try {
    const before = await api('workers' + modelQuery())
      .then((r) => r.json())
      .then((b) => b.workers)
      .catch(() => null);
    t0 = performance.now();
    const response = await fetch('v1/chat/completions', {
      method: 'POST',
      headers: authHeaders({ 'Content-Type': 'application/json' }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    // The router answers once a worker accepted the request, so that worker's in_flight
    // already counts it. (A response header naming the worker would be exact; read it if the
    // router sends one.)
    s.worker = response.headers.get('x-llamapool-worker');
    const requestId = response.headers.get('x-request-id');
    if (requestId) view.meta.title = `x-request-id: ${requestId}`;
    if (s.worker == null && before) {
      api('workers' + modelQuery())
        .then((r) => r.json())
        .then((w) => {
          const id = servingWorker(before, w.workers);
          if (id != null && s.worker == null) {
            s.worker = id;
            meta(state !== 'streaming');
          }
        })
        .catch(() => {});
    }
    state = 'streaming';
    $('chat-status').textContent = 'streaming…';
    for await (const data of sseEvents(response.body)) {
      if (data === '[DONE]') break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || 'the stream failed');
      const choice = chunk.choices && chunk.choices[0];
      if (choice) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          const now = performance.now();
          s.tFirst ??= now;
          s.tLast = now;
          s.deltas++;
          s.text += delta;
          view.textNode.textContent = s.text;
          scrollDown();
        }
        if (choice.finish_reason) s.finish = choice.finish_reason;
      }
      if (chunk.timings) s.timings = chunk.timings;
      if (chunk.usage) s.usage = chunk.usage;
      meta(false);
    }
    state = 'done';
  } catch (e) {
    if (e.name === 'AbortError') {
      state = 'stopped';
      s.finish = 'stopped';
    } else {
      state = 'error';
      view.node.after(el('div', { class: 'msg msg-error' }, e.message));
    }
  } finally {
    if (chat.controller === controller) chat.controller = null;
    view.node.classList.remove('streaming');
    view.node.dataset.state = state;
    if (s.text || state === 'done') chat.history.push({ role: 'assistant', content: s.text });
    else chat.history.pop(); // a turn that got no answer is not sent again
    meta(true);
    recordOwnRequest(s, t0);
    setBusy(false);
    $('chat-status').textContent = state === 'streaming' ? '' : state;
    scrollDown();
  }
}

/** Adds this page's own request to the latency charts. */
function recordOwnRequest(s, t0) {
  const t = Date.now();
  if (s.tFirst != null) addPoint('ttft', 'this page', t, s.tFirst - t0);
  let itl = null;
  if (s.timings && s.timings.predicted_n > 1) itl = s.timings.predicted_ms / (s.timings.predicted_n - 1);
  else if (s.deltas > 1) itl = (s.tLast - s.tFirst) / (s.deltas - 1);
  addPoint('itl', 'this page', t, itl);
  drawCharts();
}

function stop() {
  if (chat.controller) chat.controller.abort();
}

// ---------------------------------------------------------------------------------------
// Wiring

function init() {
  const key = $('api-key');
  key.value = apiKey();
  let keyTimer = null;
  const saveKey = () => {
    clearTimeout(keyTimer);
    const v = key.value.trim();
    if (v) localStorage.setItem(KEY_STORE, v);
    else localStorage.removeItem(KEY_STORE);
    modelName = null;
    poll();
  };
  key.addEventListener('input', () => {
    clearTimeout(keyTimer);
    keyTimer = setTimeout(saveKey, 400);
  });
  key.addEventListener('change', saveKey);
  $('model-select').addEventListener('change', (e) => {
    modelName = e.target.value;
    poll();
  });

  $('chat-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const prompt = $('prompt').value.trim();
    if (!prompt || chat.controller) return;
    $('prompt').value = '';
    send(prompt);
  });
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $('chat-form').requestSubmit();
    }
  });
  $('stop').addEventListener('click', stop);
  $('clear').addEventListener('click', () => {
    stop();
    chat.history = [];
    $('messages').replaceChildren();
    $('chat-status').textContent = '';
  });
  let resizeTimer = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(drawCharts, 100);
  });
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) poll();
  });
  poll();
}

init();
