// Minimal typings for buffer-layout 1.2.2 (the package ships none), covering what the cross-check test uses.
declare module "buffer-layout" {
  export class Layout<T = unknown> {
    span: number;
    property?: string;
    encode(src: T, b: Buffer, offset?: number): number;
    decode(b: Buffer, offset?: number): T;
    getSpan(b?: Buffer, offset?: number): number;
  }
  export function u8(property?: string): Layout<number>;
  export function u16(property?: string): Layout<number>;
  export function u32(property?: string): Layout<number>;
  export function s32(property?: string): Layout<number>;
  export function blob(length: number, property?: string): Layout<Buffer>;
  export function seq<T>(elementLayout: Layout<T>, count: number, property?: string): Layout<T[]>;
  export function struct<T = Record<string, unknown>>(fields: Layout<unknown>[], property?: string): Layout<T>;
}
