// The server's structured logger: one JSON object per line on stderr by default; tests pass
// their own (silent or recording).

/** Structured fields attached to a log line. */
export type LogFields = Record<string, unknown>;

/** What the server logs through. */
export interface Logger {
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
}

/** JSON lines on stderr: {"time","level","msg",...fields}. */
export function jsonLogger(stream: NodeJS.WritableStream = process.stderr): Logger {
  const write = (level: string, message: string, fields?: LogFields): void => {
    stream.write(`${JSON.stringify({ time: new Date().toISOString(), level, msg: message, ...fields })}\n`);
  };
  return {
    info: (message, fields) => write('info', message, fields),
    warn: (message, fields) => write('warn', message, fields),
    error: (message, fields) => write('error', message, fields),
  };
}

/** Discards everything. */
export const silentLogger: Logger = { info() {}, warn() {}, error() {} };
