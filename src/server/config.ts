// The configuration of `tuneserve serve`: every setting once, with its flag, environment variable,
// config-file key, type, default and meaning. Values come from the defaults, then a JSON config file
// (--config / TUNESERVE_CONFIG), then the environment, then the flags (later wins); the result is
// validated with zod at start and every problem is reported naming the setting and where its value
// came from. This module loads no gRPC code: the serve command reads the configuration before it
// starts OpenTelemetry, and only then loads the server.

import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { z } from 'zod';

/** How a setting's text (from a flag or the environment) is read. */
type Kind = 'string' | 'integer' | 'boolean' | 'list';

interface Setting {
  kind: Kind;
  schema: z.ZodType;
  /** Omitted: no default (the setting is optional). */
  default?: unknown;
  /** One line for --help and the docs. */
  doc: string;
  /** Never printed by --print-config. */
  secret?: boolean;
  /** Environment only (no flag, no file key): deprecated shorthands. */
  envOnly?: boolean;
}

const port = z.number().int().min(0).max(65535);
const nonNegative = z.number().int().min(0);
const path = z.string().min(1);

/** Every setting, by its config-file key. The flag is --kebab-case, the variable TUNESERVE_UPPER_SNAKE. */
export const SETTINGS = {
  model: { kind: 'string', schema: path, doc: 'Hugging Face Llama 3 folder to serve; absent: the built-in demo model' },
  dataRoot: { kind: 'string', schema: path, default: 'tuneserve-data', doc: 'folder for jobs, adapters, datasets and exports' },
  exportRoot: { kind: 'string', schema: path, doc: 'folder for merged models; default <dataRoot>/exports' },
  host: { kind: 'string', schema: z.string().min(1), default: '0.0.0.0', doc: 'interface of the gRPC port' },
  port: { kind: 'integer', schema: port, default: 50051, doc: 'gRPC port (0: any free port)' },
  healthPort: { kind: 'integer', schema: port, default: 0, doc: 'plaintext port serving only grpc.health.v1, for probes when the gRPC port has TLS (0: off)' },
  plaintext: { kind: 'boolean', schema: z.boolean(), default: false, doc: 'serve gRPC without TLS (needed when no tlsCert is set)' },
  tlsCert: { kind: 'string', schema: path, doc: 'PEM certificate chain of the gRPC port' },
  tlsKey: { kind: 'string', schema: path, doc: 'PEM private key of tlsCert' },
  tlsClientCa: { kind: 'string', schema: path, doc: 'PEM CA bundle: clients must present a certificate it signed (mutual TLS)' },
  authKeysFile: { kind: 'string', schema: path, doc: 'JSON file of hashed API keys with scopes and tenants (re-read while running)' },
  authReloadMs: { kind: 'integer', schema: z.number().int().min(100), default: 10_000, doc: 'how often the keys file is re-read, ms' },
  authTokens: {
    kind: 'list', schema: z.array(z.string().min(1)), default: [], secret: true, envOnly: true,
    doc: 'deprecated: comma-separated bearer tokens, each an admin key of tenant "default"',
  },
  quant: { kind: 'string', schema: z.enum(['nf4', 'none']), default: 'nf4', doc: 'base weights in device memory' },
  device: { kind: 'string', schema: z.enum(['cpu', 'cuda', 'auto']), default: 'auto', doc: 'compute device' },
  cudaCompute: { kind: 'string', schema: z.enum(['bf16', 'f32']), default: 'bf16', doc: 'CUDA compute precision' },
  threads: { kind: 'integer', schema: nonNegative, default: 0, doc: 'engine CPU threads (0: every core)' },
  kvCacheMb: { kind: 'integer', schema: nonNegative, default: 0, doc: 'KV-cache size in MiB (0: the engine decides)' },
  adapterSlots: { kind: 'integer', schema: z.number().int().min(1).max(4096), default: 16, doc: 'device slots of the adapter pool (serving and training share them)' },
  adapterHostMb: { kind: 'integer', schema: nonNegative, default: 0, doc: 'host-memory tier of the adapter pool in MiB: idle adapters kept out of a slot (0: no limit)' },
  interTokenTargetMs: {
    kind: 'integer', schema: nonNegative, default: 0,
    doc: 'while a job trains, the inter-token latency generation aims for, ms (0: one training micro-step after every generation step)',
  },
  minTrainingSharePercent: {
    kind: 'integer', schema: z.number().int().min(0).max(100), default: 10,
    doc: 'with interTokenTargetMs: the share of the busy time a training job gets at least while generations run, %',
  },
  maxSeqLen: { kind: 'integer', schema: z.number().int().min(2), default: 8192, doc: 'longest sequence in tokens' },
  maxConcurrentGenerations: { kind: 'integer', schema: z.number().int().min(1), default: 64, doc: 'generations served at once' },
  maxQueuedJobs: { kind: 'integer', schema: z.number().int().min(1), default: 16, doc: 'training jobs waiting at once' },
  reflection: { kind: 'boolean', schema: z.boolean(), default: false, doc: 'serve grpc.reflection' },
  metricsPort: { kind: 'integer', schema: port, default: 0, doc: 'Prometheus /metrics port (0: off; OTEL_METRICS_EXPORTER also works)' },
  metricsHost: { kind: 'string', schema: z.string().min(1), default: '0.0.0.0', doc: 'interface of the metrics port' },
  statusPort: { kind: 'integer', schema: port, default: 0, doc: 'status page HTTP port (0: off)' },
  statusHost: { kind: 'string', schema: z.string().min(1), default: '127.0.0.1', doc: 'interface of the status page (unauthenticated: keep it private)' },
  logLevel: {
    kind: 'string', schema: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']), default: 'info',
    doc: 'least severe log level written',
  },
  graceMs: { kind: 'integer', schema: nonNegative, default: 10_000, doc: 'on SIGTERM, how long calls in flight may finish, ms' },
  drainDelayMs: { kind: 'integer', schema: nonNegative, default: 0, doc: 'on SIGTERM, how long health says NOT_SERVING before draining, ms' },
} satisfies Record<string, Setting>;

type Settings = typeof SETTINGS;
export type SettingName = keyof Settings;

type ValueOf<S> = S extends { schema: z.ZodType<infer T> } ? T : never;
type HasDefault<S> = S extends { default: unknown } ? true : false;

/** The validated configuration: defaulted settings are always present, the others optional. */
export type ServeConfig = {
  [K in SettingName as HasDefault<Settings[K]> extends true ? K : never]: ValueOf<Settings[K]>;
} & {
  [K in SettingName as HasDefault<Settings[K]> extends true ? never : K]?: ValueOf<Settings[K]>;
};

/** Where each value came from, for errors and --print-config. */
export type ConfigSources = Partial<Record<SettingName, string>>;

/** A configuration that cannot be used; the message lists every problem, one per line. */
export class ConfigError extends Error {
  readonly code = 'INVALID_ARGUMENT';
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
  }
}

const settingNames = Object.keys(SETTINGS) as SettingName[];
const setting = (name: SettingName): Setting => SETTINGS[name] as Setting;

export const flagOf = (name: SettingName): string => `--${name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
export const envOf = (name: SettingName): string => `TUNESERVE_${name.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}`;

/** Reads a setting's text into its type; a message when the text is not of that type. */
function fromText(kind: Kind, text: string): { value: unknown } | { error: string } {
  switch (kind) {
    case 'string':
      return { value: text };
    case 'integer':
      return /^\s*-?\d+\s*$/.test(text) ? { value: Number(text) } : { error: `must be a whole number, got ${JSON.stringify(text)}` };
    case 'boolean':
      if (/^(1|true|yes|on)$/i.test(text)) return { value: true };
      if (/^(0|false|no|off)$/i.test(text)) return { value: false };
      return { error: `must be true or false, got ${JSON.stringify(text)}` };
    case 'list':
      return { value: text.split(',').map((item) => item.trim()).filter(Boolean) };
  }
}

/** The command-line flags parseArgs should accept (every setting but environment-only ones). */
export function configFlagOptions(): Record<string, { type: 'string' | 'boolean' }> {
  const options: Record<string, { type: 'string' | 'boolean' }> = {
    config: { type: 'string' },
    'print-config': { type: 'boolean' },
  };
  for (const name of settingNames) {
    if (setting(name).envOnly) continue;
    options[flagOf(name).slice(2)] = { type: setting(name).kind === 'boolean' ? 'boolean' : 'string' };
    if (setting(name).kind === 'boolean') options[`no-${flagOf(name).slice(2)}`] = { type: 'boolean' };
  }
  return options;
}

/** Inputs of loadConfig: parsed flag values (as node:util parseArgs gives them) and the environment. */
export interface ConfigInputs {
  flags: Record<string, string | boolean | undefined>;
  env: NodeJS.ProcessEnv;
}

/** Resolves and validates the configuration; ConfigError naming each bad setting and its source. */
export function loadConfig({ flags, env }: ConfigInputs): { config: ServeConfig; sources: ConfigSources; file: string | null } {
  const problems: string[] = [];
  const raw: Partial<Record<SettingName, unknown>> = {};
  const sources: ConfigSources = {};

  // 1. Defaults.
  for (const name of settingNames) {
    const s = setting(name);
    if ('default' in s) {
      raw[name] = s.default;
      sources[name] = 'default';
    }
  }

  // 2. The config file.
  const fileFlag = typeof flags.config === 'string' ? flags.config : undefined;
  const file = fileFlag ?? (env.TUNESERVE_CONFIG || undefined) ?? null;
  if (file !== null) {
    const origin = fileFlag !== undefined ? '--config' : 'TUNESERVE_CONFIG';
    let parsed: unknown;
    try {
      parsed = JSON.parse(readFileSync(file, 'utf8'));
    } catch (error) {
      throw new ConfigError([`config file ${file} (from ${origin}) cannot be read as JSON: ${(error as Error).message}`]);
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
      throw new ConfigError([`config file ${file} must hold one JSON object of settings`]);
    }
    for (const [key, value] of Object.entries(parsed)) {
      if (!(key in SETTINGS) || setting(key as SettingName).envOnly) {
        problems.push(`${key} (config file ${file}): is not a setting; known settings: ${settingNames.filter((n) => !setting(n).envOnly).join(', ')}`);
        continue;
      }
      raw[key as SettingName] = value;
      sources[key as SettingName] = `config file ${file}`;
    }
  }

  // 3. The environment, 4. the flags.
  for (const name of settingNames) {
    const s = setting(name);
    const text = env[envOf(name)];
    if (text !== undefined && text !== '') {
      const read = fromText(s.kind, text);
      if ('error' in read) problems.push(`${name} (${envOf(name)}): ${read.error}`);
      else raw[name] = read.value;
      sources[name] = envOf(name);
    }
    if (s.envOnly) continue;
    const flag = flagOf(name).slice(2);
    const given = flags[flag] ?? (flags[`no-${flag}`] === true ? false : undefined);
    if (given === undefined) continue;
    sources[name] = flagOf(name);
    if (typeof given === 'boolean') {
      raw[name] = given;
      continue;
    }
    const read = fromText(s.kind, given);
    if ('error' in read) problems.push(`${name} (${flagOf(name)}): ${read.error}`);
    else raw[name] = read.value;
  }

  // Each value against its own schema: a message naming the setting and its source.
  const config: Partial<Record<SettingName, unknown>> = {};
  for (const name of settingNames) {
    if (!(name in raw)) continue;
    const result = setting(name).schema.safeParse(raw[name]);
    if (result.success) config[name] = result.data;
    else problems.push(`${name} (${sources[name]}): ${result.error.issues.map((issue) => issue.message).join('; ')}`);
  }
  if (problems.length > 0) throw new ConfigError(problems);

  // Settings that only make sense together.
  const c = config as ServeConfig;
  const from = (name: SettingName): string => `${name} (${sources[name] ?? 'unset'})`;
  if (c.plaintext && (c.tlsCert !== undefined || c.tlsKey !== undefined)) {
    problems.push(`${from('plaintext')}: cannot be combined with tlsCert/tlsKey; choose TLS or plaintext`);
  }
  if (!c.plaintext && (c.tlsCert === undefined || c.tlsKey === undefined)) {
    problems.push(
      c.tlsCert === undefined && c.tlsKey === undefined
        ? `tlsCert and tlsKey (${flagOf('tlsCert')}, ${flagOf('tlsKey')}): are required unless plaintext is set (${flagOf('plaintext')} or ${envOf('plaintext')}=true); the gRPC port no longer defaults to plaintext`
        : `${c.tlsCert === undefined ? 'tlsCert' : 'tlsKey'}: is required with ${c.tlsCert === undefined ? from('tlsKey') : from('tlsCert')}`,
    );
  }
  if (c.tlsClientCa !== undefined && c.tlsCert === undefined) problems.push(`${from('tlsClientCa')}: needs tlsCert and tlsKey (mutual TLS is TLS)`);
  for (const name of ['model', 'tlsCert', 'tlsKey', 'tlsClientCa', 'authKeysFile'] as const) {
    const value = c[name];
    if (value !== undefined && !existsSync(value)) problems.push(`${from(name)}: ${resolve(value)} does not exist`);
  }
  if (c.authKeysFile !== undefined && c.authTokens.length > 0) {
    problems.push(`${from('authTokens')}: cannot be combined with ${from('authKeysFile')}; move the tokens into the keys file`);
  }
  for (const [a, b] of [['port', 'metricsPort'], ['port', 'statusPort'], ['metricsPort', 'statusPort'], ['port', 'healthPort'], ['metricsPort', 'healthPort'], ['statusPort', 'healthPort']] as const) {
    if (c[a] !== 0 && c[a] === c[b]) problems.push(`${from(b)}: is the same port as ${from(a)}`);
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return { config: c, sources, file };
}

/** The configuration as --print-config shows it: every setting, its value (secrets hidden) and source. */
export function describeConfig(config: ServeConfig, sources: ConfigSources): Record<string, { value: unknown; source: string }> {
  const out: Record<string, { value: unknown; source: string }> = {};
  for (const name of settingNames) {
    const value = (config as Record<string, unknown>)[name];
    const shown = setting(name).secret && Array.isArray(value) ? (value.length === 0 ? [] : `[${value.length} hidden]`) : (value ?? null);
    out[name] = { value: shown, source: sources[name] ?? 'unset' };
  }
  return out;
}

/** The settings table (flag, variable, default, meaning) for `tuneserve serve --help`. */
export function settingsHelp(): string {
  const lines = settingNames.map((name) => {
    const s = setting(name);
    const flag = s.envOnly ? '(env only)' : flagOf(name);
    const fallback = 'default' in s ? ` [default ${JSON.stringify(s.default)}]` : '';
    return `  ${name.padEnd(26)} ${flag.padEnd(28)} ${envOf(name).padEnd(36)} ${s.doc}${fallback}`;
  });
  return [
    'usage: tuneserve serve [--config FILE.json] [--print-config] [flags]',
    '',
    'Every setting is a key of the JSON config file, a flag and a TUNESERVE_* variable. Precedence: flag >',
    'variable > file > default. Boolean flags also have a --no- form. OpenTelemetry reads the standard OTEL_* variables.',
    '',
    `  ${'key'.padEnd(26)} ${'flag'.padEnd(28)} ${'variable'.padEnd(36)} meaning`,
    ...lines,
    '',
  ].join('\n');
}
