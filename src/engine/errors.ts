// The one error type of the engine's TypeScript side. Every failure callers may branch on carries a
// stable UPPER_SNAKE_CASE `code`; errors thrown by the native addon carry the same kind of `code`.

/** Codes used by the TypeScript engine and the native addon (the addon may add its own). */
export type EngineErrorCode =
  | 'INVALID_CONFIG' // config.json / generation_config.json / adapter_config.json / index.json is wrong
  | 'INVALID_MODEL' // the weights do not match the config (missing tensor, wrong shape or dtype)
  | 'INVALID_SAFETENSORS' // a .safetensors file is malformed
  | 'INVALID_DATASET' // a JSONL training row is wrong ("<file>:<line>: <problem>")
  | 'INVALID_ARGUMENT' // a caller passed a bad value
  | 'UNSUPPORTED' // well-formed but outside what the engine implements (e.g. DoRA)
  | 'ADAPTER_MISMATCH' // an adapter does not fit the loaded base
  | 'NOT_FOUND' // a file or folder is missing
  | 'IO_ERROR' // reading or writing failed
  | 'CANCELLED'; // work was cancelled by its caller

export class EngineError extends Error {
  readonly code: string;
  readonly details?: Record<string, unknown>;

  constructor(code: EngineErrorCode | (string & {}), message: string, details?: Record<string, unknown>, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'EngineError';
    this.code = code;
    if (details !== undefined) this.details = details;
  }
}

/** True for an EngineError and for any Error with a string `code` (the addon's errors). */
export function hasErrorCode(error: unknown): error is Error & { code: string } {
  return error instanceof Error && typeof (error as { code?: unknown }).code === 'string';
}

/**
 * Turns anything thrown into an EngineError: EngineErrors pass through, coded errors (native addon,
 * Node's fs with ENOENT etc.) keep their meaning, anything else (Node's ERR_* included) becomes
 * `fallbackCode`.
 */
export function toEngineError(error: unknown, fallbackCode: EngineErrorCode = 'IO_ERROR'): EngineError {
  if (error instanceof EngineError) return error;
  if (hasErrorCode(error)) {
    const nodeCode = error.code;
    if (nodeCode === 'ENOENT') return new EngineError('NOT_FOUND', error.message, { syscallCode: nodeCode }, { cause: error });
    if (/^E[A-Z]+$/.test(nodeCode)) return new EngineError('IO_ERROR', error.message, { syscallCode: nodeCode }, { cause: error });
    if (!nodeCode.startsWith('ERR_')) return new EngineError(nodeCode, error.message, undefined, { cause: error });
  }
  const message = error instanceof Error ? error.message : String(error);
  return new EngineError(fallbackCode, message, undefined, { cause: error });
}
