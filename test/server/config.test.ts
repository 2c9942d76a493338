// The serve configuration: precedence (flag > TUNESERVE_* variable > JSON file > default), every
// problem reported at once naming the setting and where its value came from, the rules that tie
// settings together (TLS or an explicit plaintext; files that must exist), and `serve --print-config`
// showing each value with its source and no secret. `tuneserve keys create` makes entries the
// server's own keys-file parser accepts.

import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { PassThrough } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { keysCommand } from '../../src/cli/keys-command.js';
import { serveCommand } from '../../src/cli/serve-command.js';
import { hashKey, parseKeysFile } from '../../src/server/auth.js';
import { ConfigError, envOf, flagOf, loadConfig, SETTINGS } from '../../src/server/config.js';
import { makeSandbox } from './harness.js';

const problemsOf = (run: () => unknown): string[] => {
  try {
    run();
  } catch (error) {
    if (error instanceof ConfigError) return error.problems;
    throw error;
  }
  throw new Error('expected a ConfigError');
};

describe('serve configuration', () => {
  let sandbox = '';
  beforeEach(async () => {
    sandbox = await makeSandbox();
  });
  afterEach(async () => {
    await fs.rm(sandbox, { recursive: true, force: true });
  });

  it('takes flags over variables over the file over defaults, and says where each value came from', async () => {
    const file = path.join(sandbox, 'tuneserve.json');
    await fs.writeFile(file, JSON.stringify({ port: 7000, host: '127.0.0.1', threads: 3, plaintext: true, logLevel: 'warn' }));
    const { config, sources } = loadConfig({
      flags: { config: file, port: '9000' },
      env: { TUNESERVE_PORT: '8000', TUNESERVE_THREADS: '5', TUNESERVE_REFLECTION: 'true' },
    });
    expect(config).toMatchObject({ port: 9000, threads: 5, host: '127.0.0.1', reflection: true, plaintext: true, logLevel: 'warn', adapterSlots: 16 });
    expect(sources).toMatchObject({ port: '--port', threads: 'TUNESERVE_THREADS', host: `config file ${file}`, adapterSlots: 'default' });
  });

  it('reports every bad setting at once, naming it and its source', async () => {
    const file = path.join(sandbox, 'bad.json');
    await fs.writeFile(file, JSON.stringify({ port: 70000, quant: 'int3', portt: 1 }));
    const problems = problemsOf(() =>
      loadConfig({ flags: { config: file, threads: 'many', plaintext: true }, env: { TUNESERVE_LOG_LEVEL: 'chatty', TUNESERVE_REFLECTION: 'maybe' } }),
    );
    expect(problems).toEqual(
      expect.arrayContaining([
        expect.stringMatching(/^portt \(config file .*\): is not a setting/),
        expect.stringMatching(/^port \(config file .*\): .*65535/),
        expect.stringMatching(/^quant \(config file .*\): /),
        'threads (--threads): must be a whole number, got "many"',
        expect.stringMatching(/^logLevel \(TUNESERVE_LOG_LEVEL\): /),
        'reflection (TUNESERVE_REFLECTION): must be true or false, got "maybe"',
      ]),
    );
    expect(problems).toHaveLength(6);
  });

  it('needs TLS files or an explicit plaintext, and files that exist', () => {
    expect(problemsOf(() => loadConfig({ flags: {}, env: {} }))[0]).toMatch(/^tlsCert and tlsKey .*required unless plaintext is set/);
    expect(problemsOf(() => loadConfig({ flags: { 'tls-cert': '/nonexistent/cert.pem' }, env: {} }))).toEqual(
      expect.arrayContaining([expect.stringMatching(/^tlsKey: is required with tlsCert \(--tls-cert\)/), expect.stringMatching(/^tlsCert \(--tls-cert\): .* does not exist/)]),
    );
    expect(problemsOf(() => loadConfig({ flags: { plaintext: true, 'tls-client-ca': '/x' }, env: {} }))[0]).toMatch(/^tlsClientCa \(--tls-client-ca\): needs tlsCert/);
    expect(problemsOf(() => loadConfig({ flags: { plaintext: true, 'metrics-port': '50051' }, env: {} }))).toEqual([
      'metricsPort (--metrics-port): is the same port as port (default)',
    ]);
    expect(loadConfig({ flags: {}, env: { TUNESERVE_PLAINTEXT: '1' } }).config.plaintext).toBe(true);
  });

  it('names each setting once: a flag and a variable derived from its key', () => {
    expect(flagOf('tlsClientCa')).toBe('--tls-client-ca');
    expect(envOf('tlsClientCa')).toBe('TUNESERVE_TLS_CLIENT_CA');
    // The deprecated token list is the variable it always was.
    expect(envOf('authTokens')).toBe('TUNESERVE_AUTH_TOKENS');
    expect(Object.keys(SETTINGS)).toContain('statusPort');
  });

  it('serve --print-config prints every value with its source and hides the tokens', async () => {
    const out = new PassThrough();
    let text = '';
    out.on('data', (chunk: Buffer) => (text += chunk.toString()));
    const saved = { ...process.env };
    try {
      process.env.TUNESERVE_AUTH_TOKENS = 'super-secret-1,super-secret-2';
      await serveCommand(['--plaintext', '--port', '6000', '--print-config'], { stdout: out });
    } finally {
      process.env = saved;
    }
    const printed = JSON.parse(text) as { settings: Record<string, { value: unknown; source: string }> };
    expect(printed.settings.port).toEqual({ value: 6000, source: '--port' });
    expect(printed.settings.authTokens).toEqual({ value: '[2 hidden]', source: 'TUNESERVE_AUTH_TOKENS' });
    expect(text).not.toContain('super-secret');
  });

  it('keys create prints a key once and writes an entry the server accepts', async () => {
    const file = path.join(sandbox, 'keys.json');
    const outputs: string[] = [];
    for (const [id, scopes] of [['ci', 'train'], ['app', 'generate']] as const) {
      const out = new PassThrough();
      let text = '';
      out.on('data', (chunk: Buffer) => (text += chunk.toString()));
      await keysCommand(['create', '--id', id, '--tenant', 'acme', '--scopes', scopes, '--file', file], { stdout: out });
      outputs.push(text);
    }
    const keys = parseKeysFile(await fs.readFile(file, 'utf8'), file);
    expect(keys.map((k) => [k.id, k.principal.tenant, [...k.principal.scopes]])).toEqual([['ci', 'acme', ['train']], ['app', 'acme', ['generate']]]);
    const [key] = outputs[0]!.split('\n');
    expect(key).toMatch(/^tsk_[A-Za-z0-9_-]{43}$/);
    expect(keys[0]!.hash.toString('hex')).toBe(hashKey(key!));
    expect(await fs.readFile(file, 'utf8')).not.toContain(key!);
    await expect(keysCommand(['create', '--id', 'ci', '--tenant', 'acme', '--scopes', 'train', '--file', file], { stdout: new PassThrough() })).rejects.toThrow(/repeats "ci"/);
    await expect(keysCommand(['create', '--id', 'x', '--tenant', 'acme', '--scopes', 'root'], { stdout: new PassThrough() })).rejects.toThrow(/"root" is not one of/);
  });
});
