/**
 * Asynchronous events (QMP events, qtest IRQ lines) handed to waiters: an
 * event goes to the first waiter it matches, else it is kept; a wait first
 * takes the oldest kept event that matches. Each event is handed out once.
 */
interface Waiter<T> {
  match(ev: T): boolean;
  resolve(ev: T): void;
}

export class EventQueue<T> {
  private readonly unconsumed = new Set<T>();
  private readonly waiters = new Set<Waiter<T>>();

  push(ev: T): void {
    for (const w of this.waiters) {
      if (w.match(ev)) {
        w.resolve(ev);
        return;
      }
    }
    this.unconsumed.add(ev);
  }

  /** Resolves with the first matching event; rejects with `onTimeout()` after `timeoutMs`. */
  wait(match: (ev: T) => boolean, timeoutMs: number, onTimeout: () => Error): Promise<T> {
    for (const ev of this.unconsumed) {
      if (match(ev)) {
        this.unconsumed.delete(ev);
        return Promise.resolve(ev);
      }
    }
    return new Promise<T>((resolve, reject) => {
      const w: Waiter<T> = {
        match,
        resolve: (ev) => {
          clearTimeout(timer);
          this.waiters.delete(w);
          resolve(ev);
        },
      };
      const timer = setTimeout(() => {
        this.waiters.delete(w);
        reject(onTimeout());
      }, timeoutMs);
      this.waiters.add(w);
    });
  }

  /** Forget the events kept so far. */
  clear(): void {
    this.unconsumed.clear();
  }
}
