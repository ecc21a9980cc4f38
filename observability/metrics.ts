/**
 * Prometheus metrics: one registry per process, with Node's default metrics, exposed at
 * GET /metrics. Parts of the system add their own through the `metrics` they are given.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export class Metrics {
  readonly registry = new Registry();

  constructor(labels: Record<string, string> = {}) {
    this.registry.setDefaultLabels(labels);
    collectDefaultMetrics({ register: this.registry, prefix: 'kchat_' });
  }

  /**
   * A metric is registered once per name: parts that run several times in one process (a
   * runtime per actor) share it and tell themselves apart by label.
   */
  counter(name: string, help: string, labelNames: string[] = []): Counter {
    return (
      (this.registry.getSingleMetric(name) as Counter | undefined) ??
      new Counter({ name, help, labelNames, registers: [this.registry] })
    );
  }

  gauge(name: string, help: string, collect?: (gauge: Gauge) => void): Gauge {
    return new Gauge({
      name,
      help,
      registers: [this.registry],
      collect: collect
        ? function (this: Gauge) {
            collect(this);
          }
        : undefined,
    });
  }

  histogram(name: string, help: string, buckets: number[], labelNames: string[] = []): Histogram {
    return (
      (this.registry.getSingleMetric(name) as Histogram | undefined) ??
      new Histogram({ name, help, buckets, labelNames, registers: [this.registry] })
    );
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
