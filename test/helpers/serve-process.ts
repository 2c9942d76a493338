// A real `tuneserve serve` process (node bin/tuneserve.js, dist/ rebuilt when stale) for tests of
// what only the process does: configuration from flags and variables, OpenTelemetry started before
// gRPC, logs on stderr, SIGTERM. Its stderr is parsed as pino JSON lines; the gRPC port is read from
// the "listening" line (the process is started with --port 0).

import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { ensureDistFresh, ROOT } from './dist.js';

export interface LogLine {
  level: string;
  msg: string;
  [field: string]: unknown;
}

export interface ServeProcess {
  child: ChildProcess;
  port: number;
  /** Every stderr line parsed as JSON (lines that are not JSON are kept as { level: 'raw', msg }). */
  lines: LogLine[];
  /** stderr exactly as written. */
  stderr(): string;
  /** Resolves with the exit code once the process ends. */
  exited: Promise<number | null>;
  /** Waits for a log line matching `test`. */
  waitFor(test: (line: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>;
  /** SIGKILL when still running. */
  kill(): void;
}

export async function startServe(args: string[], env: NodeJS.ProcessEnv, options: { readyTimeoutMs?: number } = {}): Promise<ServeProcess> {
  await ensureDistFresh();
  const child = spawn(process.execPath, [join(ROOT, 'bin', 'tuneserve.js'), 'serve', '--port', '0', ...args], {
    cwd: ROOT,
    env: { PATH: process.env.PATH, HOME: process.env.HOME, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: LogLine[] = [];
  let raw = '';
  let pending = '';
  const waiters = new Set<() => void>();
  child.stderr!.on('data', (chunk: Buffer) => {
    raw += chunk.toString();
    pending += chunk.toString();
    let newline: number;
    while ((newline = pending.indexOf('\n')) !== -1) {
      const text = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      if (text.trim() === '') continue;
      try {
        lines.push(JSON.parse(text) as LogLine);
      } catch {
        lines.push({ level: 'raw', msg: text });
      }
    }
    for (const wake of waiters) wake();
  });
  child.stdout!.resume();
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const waitFor = (test: (line: LogLine) => boolean, timeoutMs = 120_000): Promise<LogLine> =>
    new Promise((resolve, reject) => {
      const check = (): void => {
        const found = lines.find(test);
        if (found) {
          waiters.delete(check);
          clearTimeout(timer);
          resolve(found);
        }
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`no matching log line in ${timeoutMs} ms; stderr:\n${raw.slice(-4000)}`));
      }, timeoutMs);
      waiters.add(check);
      void exited.then(() => {
        if (waiters.has(check)) {
          waiters.delete(check);
          clearTimeout(timer);
          reject(new Error(`tuneserve serve exited; stderr:\n${raw.slice(-4000)}`));
        }
      });
      check();
    });
  const listening = await waitFor((line) => line.msg === 'listening', options.readyTimeoutMs ?? 120_000);
  await waitFor((line) => line.msg === 'serving', options.readyTimeoutMs ?? 120_000);
  return {
    child,
    port: Number(listening.port),
    lines,
    stderr: () => raw,
    exited,
    waitFor,
    kill: () => {
      if (child.exitCode === null) child.kill('SIGKILL');
    },
  };
}
