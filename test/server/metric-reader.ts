// An in-memory OpenTelemetry metric reader for tests: collect() on demand, values by name.

import { MetricReader, type DataPoint, type Histogram } from '@opentelemetry/sdk-metrics';

export class TestMetricReader extends MetricReader {
  protected override async onForceFlush(): Promise<void> {}
  protected override async onShutdown(): Promise<void> {}

  /** Every data point of a metric, after a fresh collection. */
  async points(name: string): Promise<DataPoint<number | Histogram>[]> {
    const { resourceMetrics } = await this.collect();
    return resourceMetrics.scopeMetrics
      .flatMap((scope) => scope.metrics)
      .filter((metric) => metric.descriptor.name === name)
      .flatMap((metric) => metric.dataPoints as DataPoint<number | Histogram>[]);
  }

  /** Sum of a counter's points. */
  async counterTotal(name: string): Promise<number> {
    return (await this.points(name)).reduce((sum, point) => sum + (point.value as number), 0);
  }

  /** Total count of a histogram's points. */
  async histogramCount(name: string): Promise<number> {
    return (await this.points(name)).reduce((sum, point) => sum + (point.value as Histogram).count, 0);
  }
}
