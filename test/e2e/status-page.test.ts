// The status page in a real browser during a real training job: the server over the real engine
// (small random model), its status page on 127.0.0.1, headless Chromium (Debian's chromium, driven by
// puppeteer-core) loading the page while a job trains. The loss curve must grow while the page is
// open (the number of steps drawn increases between two looks without reloading: server-sent events,
// not a snapshot), evaluation points appear, and the pool and memory sections show the engine's
// figures. The screenshot is kept as a test artifact under the OS temp folder (path printed).
// CI installs chromium (.ci/run); elsewhere the suite skips loudly without it.

import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TrainingConfig } from '../../src/gen/tuneserve/v1/training.js';
import { startStatusPage, type StatusPage } from '../../src/server/status-page.js';
import { ROOT } from '../helpers/dist.js';
import { startRealServer, type RealServer } from '../helpers/real-server.js';
import { call, collect, connect, upload, type Clients } from '../server/harness.js';

const CHROMIUM = ['/usr/bin/chromium', '/usr/bin/chromium-browser', process.env.CHROMIUM_PATH ?? ''].find((p) => p !== '' && existsSync(p)) ?? null;
if (CHROMIUM === null && process.env.CI) throw new Error('CI needs chromium for the status-page test (apt-get install -y chromium)');
if (CHROMIUM === null) console.warn('\n!!! SKIPPING the status-page browser test: no chromium (apt-get install -y chromium)\n');

describe.skipIf(CHROMIUM === null)('status page in Chromium during a real training job', () => {
  let real: RealServer;
  let clients: Clients;
  let page: StatusPage;
  let browser: import('puppeteer-core').Browser;

  beforeAll(async () => {
    real = await startRealServer({ preset: 'small', seed: 17 });
    clients = connect(real.server.port);
    page = await startStatusPage(real.server.status, { host: '127.0.0.1', port: 0 });
    await upload(clients, 'memorize', await readFile(join(ROOT, 'data', 'memorize-20.jsonl')));
    const puppeteer = await import('puppeteer-core');
    browser = await puppeteer.launch({
      executablePath: CHROMIUM!,
      headless: true,
      // Root in CI containers: no sandbox; /dev/shm is small there.
      args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
    });
  }, 300_000);

  afterAll(async () => {
    await browser?.close();
    await page?.close();
    clients?.close();
    await real?.dispose();
  });

  it('draws the running job\'s loss curve and it grows while the page is open', async () => {
    // A long job (it is cancelled once the page has shown enough), with evaluations every 5 steps.
    const started = await collect(clients.training.train({
      jobId: 'watched', adapterId: 'watched-bot', datasetId: 'memorize', initAdapterId: '', detach: true,
      config: TrainingConfig.fromPartial({ maxSteps: 400, batchSize: 2, gradAccum: 1, learningRate: 1e-3, evalFraction: 0.2, evalEvery: 5, targetModules: ['q_proj', 'v_proj'] }),
    }));
    expect(started.error).toBeNull();

    const tab = await browser.newPage();
    const errors: string[] = [];
    tab.on('pageerror', (error) => errors.push(String(error)));
    tab.on('console', (message) => { if (message.type() === 'error') errors.push(message.text()); });
    await tab.goto(`http://127.0.0.1:${page.port}/`, { waitUntil: 'domcontentloaded' });
    const points = (): Promise<number> => tab.$eval('#chart', (svg) => Number(svg.getAttribute('data-points')));
    await tab.waitForFunction(() => document.querySelector('#chart')?.getAttribute('data-job') === 'watched', { timeout: 60_000 });
    await tab.waitForFunction(() => Number(document.querySelector('#chart')?.getAttribute('data-points')) >= 3, { timeout: 120_000 });
    const first = await points();
    // The same page, a little later: more steps drawn (live events, no reload).
    await tab.waitForFunction((n: number) => Number(document.querySelector('#chart')?.getAttribute('data-points')) >= n + 3, { timeout: 120_000 }, first);
    const second = await points();
    expect(second).toBeGreaterThan(first);
    // The polyline has one vertex per step drawn; evaluations are dots.
    const vertices = await tab.$eval('#chart polyline.train-loss', (line) => (line.getAttribute('points') ?? '').trim().split(/\s+/).length);
    expect(vertices).toBeGreaterThanOrEqual(second);
    await tab.waitForFunction(() => document.querySelectorAll('#chart circle.eval-loss').length >= 1, { timeout: 120_000 });

    // The jobs table, the pool and device memory come from the same server.
    await tab.waitForFunction(() => document.querySelector('tr.job[data-job="watched"] td:nth-child(2)')?.textContent === 'running', { timeout: 10_000 });
    const info = await call(clients.model.getModelInfo, clients.model, {});
    expect(await tab.$eval('#pool', (n) => n.textContent)).toContain(`of ${info.limits?.adapterSlots} slots in use`);
    expect(await tab.$eval('#memory', (n) => n.textContent)).toMatch(/weights [\d.]+ [kMG]B/);
    expect(await tab.$eval('#summary', (n) => n.textContent)).toContain('1 running');

    const screenshot = join(tmpdir(), `tuneserve-status-page-${Date.now()}.png`);
    await tab.screenshot({ path: screenshot, fullPage: true });
    console.log(`status page screenshot: ${screenshot}`);
    expect(existsSync(screenshot)).toBe(true);
    expect(errors).toEqual([]);

    await call(clients.training.cancelJob, clients.training, { jobId: 'watched' });
    // The stream ends with the job: the page stops adding points.
    await tab.waitForFunction(() => document.querySelector('tr.job[data-job="watched"] td:nth-child(2)')?.textContent === 'cancelled', { timeout: 30_000 });
    await tab.close();
  }, 600_000);
});
