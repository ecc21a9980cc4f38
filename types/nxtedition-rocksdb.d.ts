// @nxtedition/rocksdb ships no types; it implements abstract-level 1.x, whose types apply.
declare module '@nxtedition/rocksdb' {
  import { AbstractLevel, type AbstractDatabaseOptions } from 'abstract-level';

  export class RocksLevel<K = string, V = string> extends AbstractLevel<
    Buffer | Uint8Array | string,
    K,
    V
  > {
    constructor(location: string, options?: AbstractDatabaseOptions<K, V>);
    /** RocksDB's property strings, e.g. 'rocksdb.estimate-num-keys'. */
    getProperty(property: string): string;
  }
}
