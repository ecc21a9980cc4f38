import { ConfluentSchemaRegistry } from '../../schemas/registry/confluent.ts';
import { registryConformance } from '../conformance/registry.suite.ts';

registryConformance(
  `confluent (${process.env.SCHEMA_REGISTRY_URL})`,
  async () => new ConfluentSchemaRegistry(process.env.SCHEMA_REGISTRY_URL!),
  async () => undefined,
);
