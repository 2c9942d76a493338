// Stop sequences over streamed text: finds the first occurrence of any stop string across delta
// boundaries and holds back the tail that could still become one, so no byte of a stop sequence
// (or anything after it) is ever sent.

/** Matches stop strings in a stream of text. */
export class StopMatcher {
  private held = '';

  constructor(private readonly stops: readonly string[]) {}

  /** Adds text; returns what can be sent now and whether a stop sequence appeared (text after it is dropped). */
  push(text: string): { emit: string; stopped: boolean } {
    const buffer = this.held + text;
    if (this.stops.length === 0) {
      this.held = '';
      return { emit: buffer, stopped: false };
    }
    let first = -1;
    for (const stop of this.stops) {
      const at = buffer.indexOf(stop);
      if (at !== -1 && (first === -1 || at < first)) first = at;
    }
    if (first !== -1) {
      this.held = '';
      return { emit: buffer.slice(0, first), stopped: true };
    }
    let keep = 0;
    for (const stop of this.stops) {
      for (let length = Math.min(stop.length - 1, buffer.length); length > keep; length -= 1) {
        if (buffer.endsWith(stop.slice(0, length))) {
          keep = length;
          break;
        }
      }
    }
    this.held = buffer.slice(buffer.length - keep);
    return { emit: buffer.slice(0, buffer.length - keep), stopped: false };
  }

  /** Returns the held-back text once no more text will come. */
  flush(): string {
    const rest = this.held;
    this.held = '';
    return rest;
  }
}
