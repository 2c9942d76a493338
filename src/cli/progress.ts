// A one-line progress bar for terminals (redrawn in place with \r); on a non-TTY stream it prints a
// line at most every few seconds so logs stay readable.

export class ProgressBar {
  private lastPrint = 0;
  private drawn = false;

  constructor(private readonly out: NodeJS.WriteStream) {}

  update(done: number, total: number, label: string): void {
    const width = 28;
    const frac = total > 0 ? Math.min(1, done / total) : 0;
    const filled = Math.round(frac * width);
    const line = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${done}/${total} ${label}`;
    if (this.out.isTTY) {
      this.out.write(`\r${line.slice(0, (this.out.columns || 120) - 1)}\x1b[K`);
      this.drawn = true;
    } else {
      const now = Date.now();
      if (now - this.lastPrint > 2000 || done === total) {
        this.out.write(`${line}\n`);
        this.lastPrint = now;
      }
    }
  }

  done(): void {
    if (this.drawn) this.out.write('\n');
    this.drawn = false;
  }
}
