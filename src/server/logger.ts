// The server's logger: pino, one JSON object per line ({"level":"info","time":…,"msg":…,…fields}),
// on stderr by default. Calls log with a child logger carrying their request id. Credentials are
// never passed to the logger, and as a second line of defence the fields that could carry one (or a
// prompt) are redacted wherever they appear.

import { pino, type DestinationStream, type Logger as PinoLogger, type LevelWithSilent } from 'pino';

/** What the server logs through (pino's logger: `log.info({ fields }, 'message')`). */
export type Logger = PinoLogger;

/** Field names whose values never reach a log line, at the top level or one object down. */
const REDACTED_FIELDS = ['authorization', 'token', 'apiKey', 'key', 'password', 'secret', 'prompt', 'text', 'messages', 'chat'];

/** A pino logger with tuneserve's settings: level names as strings, ISO time, redaction. */
export function createLogger(options: { level?: LevelWithSilent; destination?: DestinationStream } = {}): Logger {
  return pino(
    {
      level: options.level ?? 'info',
      base: { service: 'tuneserve' },
      timestamp: pino.stdTimeFunctions.isoTime,
      formatters: { level: (label) => ({ level: label }) },
      redact: { paths: REDACTED_FIELDS.flatMap((field) => [field, `*.${field}`]), censor: '[redacted]' },
    },
    options.destination ?? pino.destination({ dest: 2, sync: true }),
  );
}

/** Discards everything. */
export const silentLogger: Logger = createLogger({ level: 'silent' });
