// The status page's HTML and script, as text the process serves (no build step, no framework). The
// script polls /api/status every 2 s and draws the selected job's loss curve (training loss as a line,
// evaluation loss as dots, the forgetting check's figures in the legend) from its event stream. Data goes into the page through textContent and
// SVG attributes only, never as HTML. The chart's <svg> carries data-job and data-points (steps drawn)
// so a test can watch the curve grow.

export const STATUS_PAGE_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tuneserve status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2330; background: #fafbfc; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
  .muted { color: #6a7280; }
  table { border-collapse: collapse; } th, td { text-align: left; padding: .2rem .8rem .2rem 0; }
  tr.job { cursor: pointer; } tr.job.selected { background: #e8eefc; }
  .bar { display: flex; height: 14px; width: 480px; background: #e5e7eb; border-radius: 3px; overflow: hidden; }
  .bar span { display: block; height: 100%; }
  .legend span { margin-right: 1rem; } .swatch { display: inline-block; width: 10px; height: 10px; margin-right: .3rem; }
  #chart { background: #fff; border: 1px solid #d8dce3; }
</style>
</head>
<body>
<h1>tuneserve</h1>
<div id="summary" class="muted">loading…</div>

<h2>Loss <span id="chart-title" class="muted"></span></h2>
<svg id="chart" width="640" height="260" viewBox="0 0 640 260" data-job="" data-points="0" role="img" aria-label="loss curve"></svg>
<div class="legend muted"><span><i class="swatch" style="background:#2563eb"></i>training loss</span><span><i class="swatch" style="background:#dc2626"></i>evaluation loss</span><span id="chart-last"></span></div>

<h2>Jobs</h2>
<table><thead><tr><th>job</th><th>state</th><th>adapter</th><th>tenant</th><th>step</th><th>loss</th><th>eval loss</th></tr></thead><tbody id="jobs"></tbody></table>

<h2>Adapter pool</h2>
<div id="pool" class="muted"></div>
<table><thead><tr><th>adapter</th><th>tenant</th><th>shared</th><th>loaded</th><th>final loss</th></tr></thead><tbody id="adapters"></tbody></table>

<h2>Device memory</h2>
<div id="memory-bar" class="bar"></div>
<div id="memory" class="muted"></div>
<script src="/app.js"></script>
</body>
</html>
`;

export const STATUS_PAGE_SCRIPT = `'use strict';
const SVG = 'http://www.w3.org/2000/svg';
const COLORS = { weights: '#64748b', adapter_pool: '#a855f7', kv_cache: '#0ea5e9', training_workspace: '#f59e0b', step_workspace: '#10b981', backend_scratch: '#f43f5e' };
const state = { selected: null, userSelected: false, source: null, steps: [], evals: [] };

const el = (tag, text, attrs) => {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
};
const bytes = (n) => n >= 1e9 ? (n / 1e9).toFixed(2) + ' GB' : n >= 1e6 ? (n / 1e6).toFixed(1) + ' MB' : (n / 1e3).toFixed(0) + ' kB';
const fixed = (x) => (x === null || x === undefined ? '' : Number(x).toFixed(4));

function drawChart() {
  const svg = document.getElementById('chart');
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.setAttribute('data-job', state.selected || '');
  svg.setAttribute('data-points', String(state.steps.length));
  const W = 640, H = 260, L = 48, R = 12, T = 12, B = 28;
  const all = state.steps.map((s) => s.loss).concat(state.evals.map((e) => e.loss)).filter(Number.isFinite);
  const last = state.steps[state.steps.length - 1];
  const total = Math.max(1, last ? last.totalSteps : 1, ...state.steps.map((s) => s.step));
  const lo = all.length ? Math.min(...all) : 0, hi = all.length ? Math.max(...all) : 1;
  const span = hi - lo || 1;
  const x = (step) => L + (W - L - R) * (step / total);
  const y = (loss) => T + (H - T - B) * (1 - (loss - lo) / span);
  const line = (x1, y1, x2, y2) => { const l = document.createElementNS(SVG, 'line'); for (const [k, v] of Object.entries({ x1, y1, x2, y2, stroke: '#cbd5e1' })) l.setAttribute(k, v); svg.appendChild(l); };
  const label = (x0, y0, text, anchor) => { const t = document.createElementNS(SVG, 'text'); t.setAttribute('x', x0); t.setAttribute('y', y0); t.setAttribute('font-size', '11'); t.setAttribute('fill', '#6a7280'); t.setAttribute('text-anchor', anchor || 'start'); t.textContent = text; svg.appendChild(t); };
  line(L, H - B, W - R, H - B); line(L, T, L, H - B);
  label(L - 4, T + 8, hi.toFixed(3), 'end'); label(L - 4, H - B, lo.toFixed(3), 'end');
  label(L, H - 8, 'step 0'); label(W - R, H - 8, 'step ' + total, 'end');
  if (state.steps.length > 0) {
    const path = document.createElementNS(SVG, 'polyline');
    path.setAttribute('points', state.steps.map((s) => x(s.step).toFixed(1) + ',' + y(s.loss).toFixed(1)).join(' '));
    path.setAttribute('fill', 'none'); path.setAttribute('stroke', '#2563eb'); path.setAttribute('stroke-width', '2');
    path.setAttribute('class', 'train-loss');
    svg.appendChild(path);
  }
  for (const e of state.evals) {
    const dot = document.createElementNS(SVG, 'circle');
    dot.setAttribute('cx', x(e.step)); dot.setAttribute('cy', y(e.loss)); dot.setAttribute('r', '4'); dot.setAttribute('fill', '#dc2626');
    dot.setAttribute('class', 'eval-loss');
    svg.appendChild(dot);
  }
  const lastEval = state.evals[state.evals.length - 1];
  const forgetting = lastEval && lastEval.forgettingLoss !== null && lastEval.forgettingBaseLoss !== null
    ? ', forgetting check: general-text loss ' + lastEval.forgettingBaseLoss.toFixed(4) + ' (base) → ' + lastEval.forgettingLoss.toFixed(4) : '';
  document.getElementById('chart-last').textContent = (last ? 'step ' + last.step + '/' + last.totalSteps + ', loss ' + last.loss.toFixed(4) + ', ' + last.tokensPerSecond.toFixed(0) + ' tokens/s' : '') +
    (lastEval ? ', eval loss ' + lastEval.loss.toFixed(4) + ' at step ' + lastEval.step : '') + forgetting;
}

function follow(jobId) {
  if (state.source) state.source.close();
  state.selected = jobId; state.steps = []; state.evals = [];
  document.getElementById('chart-title').textContent = jobId ? 'job ' + jobId : '(no job yet)';
  drawChart();
  if (!jobId) return;
  const source = new EventSource('/api/jobs/' + encodeURIComponent(jobId) + '/events');
  state.source = source;
  source.addEventListener('step', (m) => { state.steps.push(JSON.parse(m.data)); drawChart(); });
  source.addEventListener('eval', (m) => { state.evals.push(JSON.parse(m.data)); drawChart(); });
  source.addEventListener('end', () => source.close());
}

function render(status) {
  const model = status.model;
  document.getElementById('summary').textContent = 'server ' + status.state + (model ? ' · model ' + model.name + ' (' + model.quantization + ') on ' + model.device : '') +
    ' · training queue: ' + status.queue.running + ' running, ' + status.queue.queued + ' waiting';
  const jobs = document.getElementById('jobs');
  jobs.replaceChildren(...status.jobs.map((j) => {
    const row = el('tr', null, { class: 'job' + (j.jobId === state.selected ? ' selected' : ''), 'data-job': j.jobId });
    for (const cell of [j.jobId, j.state, j.adapterId, j.tenant, j.totalSteps ? j.step + '/' + j.totalSteps : '', fixed(j.loss), fixed(j.evalLoss)]) row.appendChild(el('td', cell));
    row.addEventListener('click', () => { state.userSelected = true; follow(j.jobId); render(status); });
    return row;
  }));
  // Follow the running job (or the newest) until the user picks one.
  const running = status.jobs.find((j) => j.state === 'running') || status.jobs[0];
  if (!state.userSelected && running && running.jobId !== state.selected) follow(running.jobId);
  const pool = status.pool;
  document.getElementById('pool').textContent = pool
    ? pool.loaded.length + ' of ' + pool.slots + ' slots in use' + (pool.loaded.length ? ': ' + pool.loaded.join(', ') : '') +
      ' · ' + pool.hits + ' hits, ' + pool.hostHits + ' from host memory, ' + pool.loads + ' loads, ' + pool.evictions + ' evictions' +
      (pool.waitingRequests ? ' · ' + pool.waitingRequests + ' waiting' : '') + ' · training share ' + Math.round(pool.trainingShare * 100) + '%'
    : 'engine not ready';
  document.getElementById('adapters').replaceChildren(...status.adapters.map((a) => {
    const row = el('tr');
    for (const cell of [a.adapterId, a.tenant, a.shared ? 'yes' : 'no', a.loaded ? 'yes' : 'no', fixed(a.finalLoss)]) row.appendChild(el('td', cell));
    return row;
  }));
  const m = status.memory;
  const bar = document.getElementById('memory-bar');
  if (m) {
    bar.replaceChildren(...Object.entries(m.uses).filter(([, n]) => n > 0).map(([use, n]) => el('span', null, { title: use + ' ' + bytes(n), style: 'width:' + (100 * n / m.deviceTotalBytes).toFixed(2) + '%;background:' + (COLORS[use] || '#999') })));
    document.getElementById('memory').textContent = Object.entries(m.uses).map(([use, n]) => use.replace('_', ' ') + ' ' + bytes(n)).join(' · ') +
      ' · free ' + bytes(m.deviceFreeBytes) + ' of ' + bytes(m.deviceTotalBytes) + ' · KV blocks ' + m.kvCacheBlocksUsed + '/' + m.kvCacheBlocks;
  }
}

async function refresh() {
  try {
    const response = await fetch('/api/status', { cache: 'no-store' });
    if (response.ok) render(await response.json());
  } catch (e) { document.getElementById('summary').textContent = 'server unreachable'; }
}
refresh();
setInterval(refresh, 2000);
`;
