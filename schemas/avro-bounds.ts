/**
 * A bounds check of Avro binary, run before avsc decodes a record from the log: avsc believes
 * the item counts it reads, so a record of a few forged bytes could exhaust the heap or spin the
 * event loop for ever. Its cost is one walk over the bytes, without allocating values.
 */
import { isUtf8 } from 'node:buffer';
import avro from 'avsc';

/**
 * Walks Avro binary as `type` wrote it, checking every length, count and index against the
 * bytes that are there, before avsc reads it. avsc trusts an array or map block count: a few
 * bytes of garbage claiming 2^29 items make it allocate until the heap is exhausted (a crash
 * no catch can stop), and 2^50 items of a field the reader skips make it loop for ever. Throws
 * (a RangeError) where the bytes cannot be a value of the type; answers the end of the value.
 */
export function checkAvroBinary(type: avro.Type, buf: Buffer, start: number): number {
  const walker = new Walker(buf, start);
  walker.walk(type as unknown as AnyType);
  return walker.pos;
}

/** The parts of avsc's types the walk reads (not in avsc's typings). */
interface AnyType {
  typeName: string;
  size: number;
  symbols: string[];
  types: AnyType[];
  itemsType: AnyType;
  valuesType: AnyType;
  fields: { type: AnyType }[];
  underlyingType: AnyType;
}

/** A class, not closures made per call: this runs for every record a process reads. */
class Walker {
  constructor(
    private readonly buf: Buffer,
    public pos: number,
  ) {}

  walk(t: AnyType): void {
    switch (t.typeName) {
      case 'null':
        return;
      case 'boolean': {
        this.skip(1, 'a boolean');
        const byte = this.buf[this.pos - 1]!;
        if (byte > 1) throw new RangeError(`a boolean byte of ${byte} at byte ${this.pos - 1}`);
        return;
      }
      case 'int':
      case 'long':
        this.long();
        return;
      case 'float':
        return this.skip(4, 'a float');
      case 'double':
        return this.skip(8, 'a double');
      case 'string':
      case 'bytes': {
        const length = this.long();
        if (length < 0) throw new RangeError(`negative length at byte ${this.pos}`);
        const at = this.pos;
        this.skip(length, `a ${t.typeName}`);
        // avsc decodes bad UTF-8 as U+FFFD: two different forged strings would read as one.
        // Most strings are ASCII, told without a view or a native call.
        if (
          t.typeName === 'string' &&
          !this.ascii(at, at + length) &&
          !isUtf8(this.buf.subarray(at, at + length))
        )
          throw new RangeError(`a string that is not UTF-8 at byte ${at}`);
        return;
      }
      case 'fixed':
        return this.skip(t.size, 'a fixed');
      case 'enum': {
        const index = this.long();
        if (!(index >= 0 && index < t.symbols.length))
          throw new RangeError(`enum index ${index} out of range at byte ${this.pos}`);
        return;
      }
      case 'array': {
        const min = minSize(t.itemsType);
        for (let n = this.block(min, 'array'); n > 0; n = this.block(min, 'array')) {
          const end = this.blockEnd;
          for (let i = 0; i < n; i++) this.walk(t.itemsType);
          this.checkBlockEnd(end, 'array');
        }
        return;
      }
      case 'map': {
        const min = 1 + minSize(t.valuesType);
        for (let n = this.block(min, 'map'); n > 0; n = this.block(min, 'map')) {
          const end = this.blockEnd;
          for (let i = 0; i < n; i++) {
            this.walk(stringType);
            this.walk(t.valuesType);
          }
          this.checkBlockEnd(end, 'map');
        }
        return;
      }
      case 'record':
      case 'error':
        for (const field of t.fields) this.walk(field.type);
        return;
      case 'union:unwrapped':
      case 'union:wrapped': {
        const index = this.long();
        const branch = t.types[index];
        if (branch === undefined)
          throw new RangeError(`union index ${index} out of range at byte ${this.pos}`);
        return this.walk(branch);
      }
      default:
        if (t.typeName.startsWith('logical:')) return this.walk(t.underlyingType);
        throw new RangeError(`unexpected Avro type ${t.typeName}`);
    }
  }

  /** Items of no bytes met so far, in every block (see block). */
  private emptyItems = 0;

  /** Where the block block() just read ends, by its byte size (-1: no size written). */
  private blockEnd = -1;

  private checkBlockEnd(end: number, what: string): void {
    if (end >= 0 && this.pos !== end)
      throw new RangeError(`${what} block says it ends at byte ${end}, its items at ${this.pos}`);
  }

  private ascii(from: number, to: number): boolean {
    for (let i = from; i < to; i++) if (this.buf[i]! > 0x7f) return false;
    return true;
  }

  private skip(n: number, what: string): void {
    if (n > this.buf.length - this.pos)
      throw new RangeError(`${what} of ${n} bytes at byte ${this.pos} runs past the record's end`);
    this.pos += n;
  }

  /** A zig-zag varint, as a double: exact enough for lengths and counts, whatever it says. */
  private long(): number {
    let n = 0;
    let scale = 1;
    for (let i = 0; ; i++) {
      if (this.pos >= this.buf.length) throw new RangeError(`truncated varint at byte ${this.pos}`);
      if (i === 10) throw new RangeError(`varint longer than 10 bytes at byte ${this.pos}`);
      const b = this.buf[this.pos++]!;
      n += (b & 0x7f) * scale;
      scale *= 128;
      if (!(b & 0x80)) break;
    }
    return n % 2 ? -(n + 1) / 2 : n / 2;
  }

  /**
   * The item count of an array's or map's next block (0: the end), refused when the bytes
   * left cannot hold that many items of at least `minItemSize` bytes each.
   */
  private block(minItemSize: number, what: string): number {
    let n = this.long();
    this.blockEnd = -1;
    if (n < 0) {
      n = -n;
      const size = this.long();
      if (size < 0) throw new RangeError(`negative ${what} block size at byte ${this.pos}`);
      // avsc skips a block it does not read by this size, reading none of its items: the walk
      // must end where that jump does, or it checked another parse than avsc makes.
      this.blockEnd = this.pos + size;
    }
    // Items of no bytes at all (null, an empty record) are capped instead, over the whole
    // record: blocks of them cost a few bytes each, and each item is a step of the walk and of
    // avsc's read or skip.
    if (minItemSize > 0 ? n * minItemSize > this.buf.length - this.pos : n > MAX_EMPTY_ITEMS)
      throw new RangeError(`${what} block of ${n} items at byte ${this.pos} exceeds the record`);
    if (minItemSize === 0 && (this.emptyItems += n) > MAX_EMPTY_ITEMS)
      throw new RangeError(`more than ${MAX_EMPTY_ITEMS} items of no bytes by byte ${this.pos}`);
    return n;
  }
}

/** Items of a type encoded in no bytes (null, an empty record) in one record, in all its blocks. */
const MAX_EMPTY_ITEMS = 1 << 16;
const stringType = avro.Type.forSchema('string') as unknown as AnyType;
const minSizes = new WeakMap<AnyType, number>();

/** The fewest bytes a value of the type takes. */
function minSize(type: AnyType): number {
  const known = minSizes.get(type);
  if (known !== undefined) return known;
  minSizes.set(type, 0); // a recursive record, met again inside itself
  let size: number;
  switch (type.typeName) {
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
      size = type.size;
      break;
    case 'record':
    case 'error':
      size = type.fields.reduce((sum, field) => sum + minSize(field.type), 0);
      break;
    default:
      // boolean, int, long, string, bytes, enum, array, map, union: at least one byte
      size = type.typeName.startsWith('logical:') ? minSize(type.underlyingType) : 1;
  }
  minSizes.set(type, size);
  return size;
}
