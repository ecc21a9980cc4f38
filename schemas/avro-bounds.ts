/**
 * A bounds check of Avro binary, run before avsc decodes a record from the log: avsc believes
 * the item counts it reads, so a record of a few forged bytes could exhaust the heap or spin the
 * event loop for ever. Its cost is one walk over the bytes, without allocating values.
 */
import avro from 'avsc';

/**
 * Walks Avro binary as `type` wrote it, checking every length, count and index against the
 * bytes that are there, before avsc reads it. avsc trusts an array or map block count: a few
 * bytes of garbage claiming 2^29 items make it allocate until the heap is exhausted (a crash
 * no catch can stop), and 2^50 items of a field the reader skips make it loop for ever. Throws
 * (a RangeError) where the bytes cannot be a value of the type; answers the end of the value.
 */
export function checkAvroBinary(type: avro.Type, buf: Buffer, start: number): number {
  let pos = start;
  const need = (n: number, what: string) => {
    if (n > buf.length - pos)
      throw new RangeError(`${what} of ${n} bytes at byte ${pos} runs past the record's end`);
  };
  const long = (): number => {
    let n = 0;
    let scale = 1;
    for (let i = 0; ; i++) {
      if (pos >= buf.length) throw new RangeError(`truncated varint at byte ${pos}`);
      if (i === 10) throw new RangeError(`varint longer than 10 bytes at byte ${pos}`);
      const b = buf[pos++]!;
      n += (b & 0x7f) * scale;
      scale *= 128;
      if (!(b & 0x80)) break;
    }
    return n % 2 ? -(n + 1) / 2 : n / 2;
  };
  const blocks = (minItemSize: number, item: () => void, what: string) => {
    for (;;) {
      let n = long();
      if (n === 0) return;
      if (n < 0) {
        n = -n;
        if (long() < 0) throw new RangeError(`negative ${what} block size at byte ${pos}`);
      }
      // Each item takes at least minItemSize bytes; items of no bytes at all are capped.
      if (minItemSize > 0 ? n * minItemSize > buf.length - pos : n > MAX_EMPTY_ITEMS)
        throw new RangeError(`${what} block of ${n} items at byte ${pos} exceeds the record`);
      for (let i = 0; i < n; i++) item();
    }
  };
  const walk = (t: avro.Type): void => {
    const any = t as unknown as {
      typeName: string;
      size: number;
      symbols: string[];
      types: avro.Type[];
      itemsType: avro.Type;
      valuesType: avro.Type;
      fields: { type: avro.Type }[];
      underlyingType: avro.Type;
    };
    switch (any.typeName) {
      case 'null':
        return;
      case 'boolean':
        need(1, 'a boolean');
        pos += 1;
        return;
      case 'int':
      case 'long':
        long();
        return;
      case 'float':
        need(4, 'a float');
        pos += 4;
        return;
      case 'double':
        need(8, 'a double');
        pos += 8;
        return;
      case 'string':
      case 'bytes': {
        const length = long();
        if (length < 0) throw new RangeError(`negative length at byte ${pos}`);
        need(length, `a ${any.typeName}`);
        pos += length;
        return;
      }
      case 'fixed':
        need(any.size, 'a fixed');
        pos += any.size;
        return;
      case 'enum': {
        const index = long();
        if (!(index >= 0 && index < any.symbols.length))
          throw new RangeError(`enum index ${index} out of range at byte ${pos}`);
        return;
      }
      case 'array':
        blocks(minSize(any.itemsType), () => walk(any.itemsType), 'array');
        return;
      case 'map':
        blocks(
          1 + minSize(any.valuesType),
          () => {
            walk(stringType);
            walk(any.valuesType);
          },
          'map',
        );
        return;
      case 'record':
      case 'error':
        for (const field of any.fields) walk(field.type);
        return;
      case 'union:unwrapped':
      case 'union:wrapped': {
        const index = long();
        const branch = any.types[index];
        if (branch === undefined)
          throw new RangeError(`union index ${index} out of range at byte ${pos}`);
        walk(branch);
        return;
      }
      default:
        if (any.typeName.startsWith('logical:')) return walk(any.underlyingType);
        throw new RangeError(`unexpected Avro type ${any.typeName}`);
    }
  };
  walk(type);
  return pos;
}

/** Items of a type encoded in no bytes (null, an empty record) in one array or map block. */
const MAX_EMPTY_ITEMS = 1 << 16;
const stringType = avro.Type.forSchema('string');
const minSizes = new WeakMap<avro.Type, number>();

/** The fewest bytes a value of the type takes. */
function minSize(type: avro.Type): number {
  const known = minSizes.get(type);
  if (known !== undefined) return known;
  minSizes.set(type, 0); // a recursive record, met again inside itself
  const any = type as unknown as {
    typeName: string;
    size: number;
    fields: { type: avro.Type }[];
    underlyingType: avro.Type;
  };
  let size: number;
  switch (any.typeName) {
    case 'null':
      size = 0;
      break;
    case 'float':
      size = 4;
      break;
    case 'double':
      size = 8;
      break;
    case 'fixed':
      size = any.size;
      break;
    case 'record':
    case 'error':
      size = any.fields.reduce((sum, field) => sum + minSize(field.type), 0);
      break;
    default:
      // boolean, int, long, string, bytes, enum, array, map, union: at least one byte
      size = any.typeName.startsWith('logical:') ? minSize(any.underlyingType) : 1;
  }
  minSizes.set(type, size);
  return size;
}
