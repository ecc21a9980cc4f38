/**
 * Prometheus metrics: one registry per process, with Node's default metrics, exposed at
 * GET /metrics. Parts of the system add their own through the `metrics` they are given.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** Buckets for the time from a record's origin to a stage of its path, in seconds. */
export const LATENCY_BUCKETS = [
  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
];

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

  gauge(name: string, help: string, collect?: (gauge: Gauge) => void | Promise<void>): Gauge {
    return new Gauge({
      name,
      help,
      registers: [this.registry],
      collect: collect
        ? function (this: Gauge) {
            return collect(this);
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
