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
  Schema: { find: Call };
  Subject: { latestVersion: Call; register: Call; updateConfig: Call };
}
interface ResponseError extends Error {
  status?: number;
}

export class ConfluentSchemaRegistry implements SchemaRegistry {
  private readonly api: Api;
  private readonly byId = new Map<number, string>();
  private readonly configured = new Set<string>();

  constructor(
    readonly url: string,
    private readonly compatibility: Compatibility = 'FULL_TRANSITIVE',
  ) {
    const client = new ConfluentClient({ host: url, clientId: 'kchat', retry: { retries: 3 } });
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

  async schemaById(id: number): Promise<string> {
    const cached = this.byId.get(id);
    if (cached !== undefined) return cached;
    try {
      const response = await this.api.Schema.find({ id });
      const schema = String(response.data().schema);
      this.byId.set(id, schema);
      return schema;
    } catch (error) {
      if ((error as ResponseError).status === 404) throw new UnknownSchemaError(id);
      throw new SchemaRegistryError(`fetching schema ${id} failed: ${reasonOf(error)}`, {
        cause: error,
      });
    }
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

function reasonOf(error: unknown): string {
  return (error as Error).message.replace(/^kchat - /, '');
}
