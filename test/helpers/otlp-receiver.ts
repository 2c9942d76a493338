// An in-process OTLP/HTTP receiver for tests: the OTLP JSON encoding (OTEL_EXPORTER_OTLP_PROTOCOL=
// http/json) on POST /v1/traces and /v1/metrics, as an OpenTelemetry Collector would take it. Spans
// are flattened to name, ids, parent and attributes; metrics keep their names and data points'
// attributes.

import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

export type AttributeValue = string | number | boolean;

export interface ReceivedSpan {
  name: string;
  traceId: string;
  spanId: string;
  parentSpanId: string;
  kind: number;
  attributes: Record<string, AttributeValue>;
  status: { code?: number; message?: string };
  resource: Record<string, AttributeValue>;
}

export interface ReceivedMetric {
  name: string;
  points: Record<string, AttributeValue>[];
}

interface OtlpKeyValue {
  key: string;
  value: { stringValue?: string; intValue?: string | number; doubleValue?: number; boolValue?: boolean };
}

const attributesOf = (list: OtlpKeyValue[] | undefined): Record<string, AttributeValue> =>
  Object.fromEntries(
    (list ?? []).map(({ key, value }) => [
      key,
      value.stringValue ?? (value.intValue !== undefined ? Number(value.intValue) : undefined) ?? value.doubleValue ?? value.boolValue ?? '',
    ]),
  );

export interface OtlpReceiver {
  /** http://127.0.0.1:<port>, for OTEL_EXPORTER_OTLP_ENDPOINT. */
  endpoint: string;
  spans: ReceivedSpan[];
  metrics: ReceivedMetric[];
  /** Request bodies as received, to check that no secret is in any of them. */
  bodies: string[];
  close(): Promise<void>;
}

export async function startOtlpReceiver(): Promise<OtlpReceiver> {
  const spans: ReceivedSpan[] = [];
  const metrics: ReceivedMetric[] = [];
  const bodies: string[] = [];
  const server: Server = createServer((request, response) => {
    let body = '';
    request.on('data', (chunk: Buffer) => (body += chunk.toString()));
    request.on('end', () => {
      bodies.push(body);
      try {
        const json = JSON.parse(body) as Record<string, unknown>;
        if (request.url === '/v1/traces') {
          for (const rs of (json.resourceSpans ?? []) as { resource?: { attributes?: OtlpKeyValue[] }; scopeSpans?: { spans?: Record<string, unknown>[] }[] }[]) {
            const resource = attributesOf(rs.resource?.attributes);
            for (const ss of rs.scopeSpans ?? []) {
              for (const span of ss.spans ?? []) {
                spans.push({
                  name: String(span.name),
                  traceId: String(span.traceId),
                  spanId: String(span.spanId),
                  parentSpanId: String(span.parentSpanId ?? ''),
                  kind: Number(span.kind ?? 0),
                  attributes: attributesOf(span.attributes as OtlpKeyValue[]),
                  status: (span.status ?? {}) as ReceivedSpan['status'],
                  resource,
                });
              }
            }
          }
        } else if (request.url === '/v1/metrics') {
          for (const rm of (json.resourceMetrics ?? []) as { scopeMetrics?: { metrics?: Record<string, unknown>[] }[] }[]) {
            for (const sm of rm.scopeMetrics ?? []) {
              for (const metric of sm.metrics ?? []) {
                const data = (metric.gauge ?? metric.sum ?? metric.histogram ?? {}) as { dataPoints?: { attributes?: OtlpKeyValue[] }[] };
                metrics.push({ name: String(metric.name), points: (data.dataPoints ?? []).map((p) => attributesOf(p.attributes)) });
              }
            }
          }
        }
        response.writeHead(200, { 'content-type': 'application/json' }).end('{}');
      } catch {
        response.writeHead(400).end();
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    endpoint: `http://127.0.0.1:${port}`,
    spans,
    metrics,
    bodies,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
