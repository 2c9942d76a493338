// Test certificates made on the spot with the openssl binary (node:crypto cannot sign X.509): a CA,
// a server certificate for 127.0.0.1/localhost, a client certificate, and a second, unrelated CA
// with its own client certificate (the "wrong certificate" cases). EC P-256 keys, valid one day.
// Without openssl the TLS tests fail in CI (CI must have it) and skip loudly elsewhere.

import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** PEM files of one party. */
export interface Party {
  cert: Buffer;
  key: Buffer;
  certFile: string;
  keyFile: string;
}

export interface TestPki {
  folder: string;
  ca: Party;
  server: Party;
  client: Party;
  /** An unrelated CA and a client certificate it signed. */
  rogueCa: Party;
  rogueClient: Party;
}

/** Why openssl cannot be used, or null when it can. */
export function opensslMissing(): string | null {
  const version = spawnSync('openssl', ['version'], { encoding: 'utf8' });
  return version.status === 0 ? null : `openssl is not available (${version.error?.message ?? version.stderr})`;
}

function openssl(args: string[], cwd: string): void {
  const result = spawnSync('openssl', args, { cwd, encoding: 'utf8', timeout: 30_000 });
  if (result.status !== 0) throw new Error(`openssl ${args.join(' ')} failed: ${result.stderr}`);
}

function party(folder: string, name: string): Party {
  const certFile = join(folder, `${name}.crt`);
  const keyFile = join(folder, `${name}.key`);
  return { cert: readFileSync(certFile), key: readFileSync(keyFile), certFile, keyFile };
}

function makeCa(folder: string, name: string): void {
  openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.crt`,
    '-days', '1', '-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], folder);
}

function makeLeaf(folder: string, name: string, ca: string, extensions: string): void {
  openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`], folder);
  writeFileSync(join(folder, `${name}.ext`), extensions);
  openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.crt`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${name}.crt`, '-days', '1',
    '-extfile', `${name}.ext`], folder);
}

/** Makes the whole set in a fresh temp folder. */
export function makeTestPki(): TestPki {
  const folder = mkdtempSync(join(tmpdir(), 'tuneserve-pki-'));
  makeCa(folder, 'ca');
  makeLeaf(folder, 'server', 'ca', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n');
  makeLeaf(folder, 'client', 'ca', 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n');
  makeCa(folder, 'rogue-ca');
  makeLeaf(folder, 'rogue-client', 'rogue-ca', 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n');
  return {
    folder,
    ca: party(folder, 'ca'),
    server: party(folder, 'server'),
    client: party(folder, 'client'),
    rogueCa: party(folder, 'rogue-ca'),
    rogueClient: party(folder, 'rogue-client'),
  };
}
