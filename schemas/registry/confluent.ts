/**
 * The schema registry port on any Confluent-compatible registry (Confluent Schema Registry,
 * Apicurio's ccompat API, Redpanda...), through @kafkajs/confluent-schema-registry's HTTP
 * client. Each subject's compatibility level is set before its first registration, so that the
 * registry itself enforces it.
 */
import { SchemaRegistry as ConfluentClient } from '@kafkajs/confluent-schema-registry';
import {
  IncompatibleSchemaError,
  InvalidSchemaError,
  SchemaRegistryError,
  NotAvroSchemaError,
  UnknownSchemaError,
  type RegisteredSchema,
  type SchemaRegistry,
} from './port.ts';
import { parseSchema, type Compatibility } from './compatibility.ts';

interface Response {
  data(): Record<string, unknown> & { message?: string };
}
type Call = (args: Record<string, unknown>) => Promise<Response>;
interface Api {
  Subject: { latestVersion: Call; register: Call; updateConfig: Call };
}
interface ResponseError extends Error {
  status?: number;
}

/** Every request to the registry gives up after this long (mappersmith has no default). */
export const REGISTRY_REQUEST_TIMEOUT_MS = 5_000;

type Middleware = NonNullable<
  ConstructorParameters<typeof ConfluentClient>[0]['middlewares']
>[number];

/**
 * mappersmith middleware: each request times out (mappersmith has none by default; a registry
 * that took the connection and never answered held a record's decode for good).
 */
const timesOut: Middleware = () => ({
  prepareRequest: (next) =>
    next().then((request) => request.enhance({ timeout: REGISTRY_REQUEST_TIMEOUT_MS })),
});

export class ConfluentSchemaRegistry implements SchemaRegistry {
  private readonly api: Api;
  private readonly byId = new Map<number, string>();
  private readonly notAvro = new Map<number, NotAvroSchemaError>();
  private readonly configured = new Set<string>();

  constructor(
    readonly url: string,
    private readonly compatibility: Compatibility = 'FULL_TRANSITIVE',
  ) {
    const client = new ConfluentClient({
      host: url,
      clientId: 'kchat',
      retry: { retries: 3 },
      middlewares: [timesOut],
    });
    this.api = (client as unknown as { api: Api }).api;
  }

  async register(subject: string, schema: string): Promise<number> {
    parseSchema(schema); // refuses invalid Avro before any request
    const text = JSON.stringify(JSON.parse(schema));
    if (!this.configured.has(subject)) {
      await this.configure(subject);
      this.configured.add(subject);
    }
    try {
      const response = await this.api.Subject.register({
        subject,
        body: { schemaType: 'AVRO', schema: text },
      });
      const id = Number(response.data().id);
      this.byId.set(id, text);
      return id;
    } catch (error) {
      const status = (error as ResponseError).status;
      if (status === 409) throw new IncompatibleSchemaError(subject, reasonOf(error));
      if (status === 422)
        throw new InvalidSchemaError(
          `registry refused the schema of "${subject}": ${reasonOf(error)}`,
        );
      throw new SchemaRegistryError(
        `registering a schema under "${subject}" failed: ${reasonOf(error)}`,
        { cause: error },
      );
    }
  }

  /**
   * A schema by its id, asked with fetch rather than the client: the registry's "no such schema"
   * is a 404 whose body carries error code 40403, and only that makes the record's schema unknown
   * (its record dead-lettered for good), as does a schema that is not Avro (a shared registry's
   * JSON Schema or Protobuf id). Any other 404 (a proxy's page, a wrong path), an answer
   * without a schema, or no answer in time is an unavailable registry: retried, and not cached.
   * The client's errors keep no body to tell them apart.
   */
  async schemaById(id: number): Promise<string> {
    const cached = this.byId.get(id);
    if (cached !== undefined) return cached;
    // An id names one schema for good: one that is not Avro is not asked for again.
    const notAvro = this.notAvro.get(id);
    if (notAvro) throw notAvro;
    const failed = (why: string, cause?: unknown) =>
      new SchemaRegistryError(`fetching schema ${id} failed: ${why}`, { cause });
    let response: globalThis.Response;
    let body: { schema?: unknown; error_code?: unknown; message?: unknown } | undefined;
    try {
      response = await fetch(`${this.url.replace(/\/+$/, '')}/schemas/ids/${id}`, {
        headers: { accept: 'application/vnd.schemaregistry.v1+json, application/json' },
        signal: AbortSignal.timeout(REGISTRY_REQUEST_TIMEOUT_MS),
      });
      body = (await response.json().catch(() => undefined)) as typeof body;
    } catch (error) {
      throw failed((error as Error).message, error);
    }
    if (response.status === 404 && body?.error_code === 40403) throw new UnknownSchemaError(id);
    if (!response.ok) throw failed(`HTTP ${response.status} ${String(body?.message ?? '')}`);
    if (typeof body?.schema !== 'string') throw failed('the answer holds no schema');
    const schemaType = (body as { schemaType?: unknown }).schemaType ?? 'AVRO';
    let why: NotAvroSchemaError | undefined;
    if (schemaType !== 'AVRO')
      why = new NotAvroSchemaError(id, `its type is ${String(schemaType)}`);
    else
      try {
        parseSchema(body.schema);
      } catch (error) {
        why = new NotAvroSchemaError(id, (error as Error).message, { cause: error });
      }
    if (why) {
      this.notAvro.set(id, why);
      throw why;
    }
    this.byId.set(id, body.schema);
    return body.schema;
  }

  async latest(subject: string): Promise<RegisteredSchema | undefined> {
    try {
      const data = (await this.api.Subject.latestVersion({ subject })).data();
      return {
        subject,
        id: Number(data.id),
        version: Number(data.version),
        schema: String(data.schema),
      };
    } catch (error) {
      if ((error as ResponseError).status === 404) return undefined;
      throw new SchemaRegistryError(`fetching the latest "${subject}" failed: ${reasonOf(error)}`, {
        cause: error,
      });
    }
  }

  async close(): Promise<void> {}

  /**
   * Sets the subject's compatibility level. Processes starting side by side configure the same
   * subjects at once: Apicurio then answers 409 to all but one (the rule was created meanwhile),
   * and the same PUT again updates the rule that now exists.
   */
  private async configure(subject: string): Promise<void> {
    const update = () =>
      this.api.Subject.updateConfig({ subject, body: { compatibility: this.compatibility } });
    for (let attempt = 1; ; attempt++) {
      try {
        await update();
        return;
      } catch (error) {
        if ((error as ResponseError).status !== 409 || attempt === 5)
          throw new SchemaRegistryError(`schema registry request failed: ${reasonOf(error)}`, {
            cause: error,
          });
        await new Promise((resolve) => setTimeout(resolve, 20 * attempt * Math.random()));
      }
    }
  }
}

/**
 * The client's error, as a person reads it: mappersmith reports its own timeout as
 * "status 400: Timeout (5000ms)", though no answer came at all.
 */
export function reasonOf(error: unknown): string {
  const message = (error as Error).message.replace(/^kchat - /, '');
  const timeout = /Timeout \((\d+)ms\)/.exec(message);
  return timeout ? `no answer within ${timeout[1]} ms` : message;
}
