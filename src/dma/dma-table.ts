/**
 * The client's DMA regions (DMA_MAP / DMA_UNMAP): which IOVA ranges the
 * device may touch, and how (an mmap'd fd, or messages over the socket).
 *
 * Regions never overlap, so ordering them by start address orders them by
 * end address too. They live in an AVL tree keyed by `iova`: map, unmap and
 * lookup cost O(log n) however full the table is (a client may keep up to
 * max_dma_maps, 65,535 by default, and QEMU maps one region per memory
 * section). Iteration is in address order.
 */
import { fail } from "../../protocol/errors.ts";
import { U64_MAX } from "../../protocol/u64.ts";

/** Bytes of a mapped fd, as the transport's mapping module provides them. */
export interface MemoryWindow {
  read(offset: bigint, length: number): Buffer;
  write(offset: bigint, data: Uint8Array): void;
  unmap(): void;
}

export interface DmaRegion {
  readonly iova: bigint;
  readonly size: bigint;
  /** Offset of the region in the fd (meaningless without one). */
  readonly offset: bigint;
  readonly readable: boolean;
  readonly writable: boolean;
  /** Present when the client passed an fd and it was mapped. */
  readonly memory: MemoryWindow | null;
}

interface Node {
  region: DmaRegion;
  /** region.iova + region.size, kept to spare the additions. */
  end: bigint;
  left: Node | null;
  right: Node | null;
  height: number;
}

const height = (n: Node | null): number => (n === null ? 0 : n.height);

function update(n: Node): void {
  const l = height(n.left);
  const r = height(n.right);
  n.height = (l > r ? l : r) + 1;
}

function rotateRight(n: Node): Node {
  const l = n.left!;
  n.left = l.right;
  l.right = n;
  update(n);
  update(l);
  return l;
}

function rotateLeft(n: Node): Node {
  const r = n.right!;
  n.right = r.left;
  r.left = n;
  update(n);
  update(r);
  return r;
}

/** Restores the AVL balance of `n` after one insert or removal below it. */
function balance(n: Node): Node {
  update(n);
  const bf = height(n.left) - height(n.right);
  if (bf > 1) {
    if (height(n.left!.left) < height(n.left!.right)) n.left = rotateLeft(n.left!);
    return rotateRight(n);
  }
  if (bf < -1) {
    if (height(n.right!.right) < height(n.right!.left)) n.right = rotateRight(n.right!);
    return rotateLeft(n);
  }
  return n;
}

function insert(n: Node | null, node: Node): Node {
  if (n === null) return node;
  if (node.region.iova < n.region.iova) n.left = insert(n.left, node);
  else n.right = insert(n.right, node);
  return balance(n);
}

/** Removes the leftmost node under `n`; returns the new subtree and that node. */
function removeMin(n: Node): { root: Node | null; min: Node } {
  if (n.left === null) return { root: n.right, min: n };
  const r = removeMin(n.left);
  n.left = r.root;
  return { root: balance(n), min: r.min };
}

/** Removes the node whose region starts at `iova` (it must exist). */
function removeAt(n: Node | null, iova: bigint): Node | null {
  if (n === null) return null;
  if (iova < n.region.iova) n.left = removeAt(n.left, iova);
  else if (iova > n.region.iova) n.right = removeAt(n.right, iova);
  else {
    if (n.left === null) return n.right;
    if (n.right === null) return n.left;
    const { root, min } = removeMin(n.right);
    min.left = n.left;
    min.right = root;
    return balance(min);
  }
  return balance(n);
}

export class DmaTable {
  private root: Node | null = null;
  private size = 0;
  /** regions() as an array, built on demand and dropped on every change. */
  private list: DmaRegion[] | null = null;

  constructor(private readonly maxMaps: number) {}

  get count(): number {
    return this.size;
  }

  /** Every region, in address order (an array built once per change of the table). */
  regions(): readonly DmaRegion[] {
    if (this.list === null) {
      const out: DmaRegion[] = [];
      for (const r of this.regionsFrom(0n)) out.push(r);
      this.list = out;
    }
    return this.list;
  }

  /**
   * The regions in address order, starting with the one holding `address`
   * (or, when none does, the first one above it). For a DMA that may run
   * across adjacent regions: take regions while each starts where the
   * previous one ended.
   */
  *regionsFrom(address: bigint): Generator<DmaRegion, void, undefined> {
    // the path to the first node whose region ends above `address`
    const stack: Node[] = [];
    let n = this.root;
    while (n !== null) {
      if (n.end > address) {
        stack.push(n);
        n = n.left;
      } else {
        n = n.right;
      }
    }
    while (stack.length > 0) {
      const top = stack.pop()!;
      yield top.region;
      for (let m = top.right; m !== null; m = m.left) stack.push(m);
    }
  }

  /** The region holding `address`, if any. */
  find(address: bigint): DmaRegion | undefined {
    const n = this.floor(address);
    return n !== null && address < n.end ? n.region : undefined;
  }

  /** Validates before anything is mapped, so a refused map costs nothing. */
  checkAdd(iova: bigint, size: bigint): void {
    if (size === 0n) throw fail.inval("DMA region of size 0");
    if (iova + size - 1n > U64_MAX) throw fail.inval("DMA region wraps past 2^64");
    if (this.size >= this.maxMaps) throw fail.nospc(`more than ${this.maxMaps} DMA regions`);
    const end = iova + size;
    // spec: overlapping an existing region is refused. Only two can: the
    // last one starting at or below `iova`, and the first one above it.
    const below = this.floor(iova);
    const other = below !== null && below.end > iova ? below : this.ceilingAbove(iova);
    if (other !== null && other.region.iova < end && iova < other.end) {
      throw fail.exist(`DMA region [0x${iova.toString(16)}, +0x${size.toString(16)}) overlaps one at 0x${other.region.iova.toString(16)}`);
    }
  }

  add(region: DmaRegion): void {
    this.checkAdd(region.iova, region.size);
    this.root = insert(this.root, { region, end: region.iova + region.size, left: null, right: null, height: 1 });
    this.size++;
    this.list = null;
  }

  /** Removes the region with exactly this iova and size; ENOENT otherwise. */
  remove(iova: bigint, size: bigint): DmaRegion {
    const n = this.floor(iova);
    if (n === null || n.region.iova !== iova || n.region.size !== size) {
      throw fail.noent(`no DMA region at 0x${iova.toString(16)} of size 0x${size.toString(16)}`);
    }
    this.root = removeAt(this.root, iova);
    this.size--;
    this.list = null;
    n.region.memory?.unmap();
    return n.region;
  }

  removeAll(): DmaRegion[] {
    const all = [...this.regions()];
    this.root = null;
    this.size = 0;
    this.list = null;
    for (const r of all) r.memory?.unmap();
    return all;
  }

  /**
   * The region holding all of [address, address + length); EFAULT when the
   * range is unmapped or straddles regions.
   */
  lookup(address: bigint, length: bigint): DmaRegion {
    const n = length < 0n ? null : this.floor(address);
    if (n === null || address + length > n.end) {
      throw fail.fault(`DMA range [0x${address.toString(16)}, +0x${length.toString(16)}) is not mapped`);
    }
    return n.region;
  }

  /** The node of the last region starting at or below `address`. */
  private floor(address: bigint): Node | null {
    let best: Node | null = null;
    let n = this.root;
    while (n !== null) {
      if (n.region.iova <= address) {
        best = n;
        n = n.right;
      } else {
        n = n.left;
      }
    }
    return best;
  }

  /** The node of the first region starting above `address`. */
  private ceilingAbove(address: bigint): Node | null {
    let best: Node | null = null;
    let n = this.root;
    while (n !== null) {
      if (n.region.iova > address) {
        best = n;
        n = n.left;
      } else {
        n = n.right;
      }
    }
    return best;
  }
}
