// `tuneserve remote <command> --addr host:port`: the CLI as a client of a running tuneserve server
// (train with a live loss readout, generate, merge, jobs, adapters, datasets, info), plus the call
// helpers and renderers that `tuneserve demo` shares. Failed calls become one error line with the
// gRPC status name, the ErrorInfo reason and the field violations.

import { SUBCOMMANDS, MAX_POSITIONALS } from './remote/commands.js';
import { COMMON_FLAGS } from './remote/flag-sets.js';
import { cliError, connectionOptions, DEFAULT_UNARY_TIMEOUT_MS, processIo, type CommandIo } from './remote/calls.js';
import { parseArgs } from 'node:util';
import { EngineError } from '../engine/errors.js';
import { createClients } from '../client/index.js';
import { float, text, type Flags } from './flags.js';

// What `tuneserve demo` and the tests use from the remote commands.
export { cliError, describeCallError, isServiceError, statusName, unary, type CommandIo } from './remote/calls.js';
export { formatBytes, formatSeconds, formatTable } from './remote/render.js';
export { followJob, throwUnlessCompleted, type JobOutcome } from './remote/jobs.js';
export { describeMerge, ensureDataset, generateText, mergeAdapter, type Generation } from './remote/operations.js';

export const REMOTE_USAGE = `usage: tuneserve remote <command> [--addr host:port] [--api-key KEY] [--plaintext | --tls-ca PEM [--tls-cert PEM --tls-key PEM]]
                        [--timeout SECONDS] [--json]

  info                                 the served base model, device, memory and limits
  train     (--dataset-file FILE.jsonl | --dataset ID) --adapter-id NAME [--job-id ID] [--init-adapter NAME]
            [--rank --alpha --dropout --targets LIST|all-linear --lr --steps --epochs --batch-size --grad-accum
             --max-seq-len --scheduler constant|linear|cosine --warmup-steps --weight-decay --max-grad-norm --seed
             --no-shuffle --eval-fraction --eval-every --checkpoint-every --packing auto|on|off] [--detach]
  generate  (--prompt TEXT [--chat] | --messages JSON | --prompt-ids 1,2,3) [--adapter NAME] [--max-tokens N]
            [--temperature 0] [--top-k --top-p --repetition-penalty --seed --stop TEXT (repeatable) --ignore-eos]
  merge     --adapter NAME --out-name NAME [--dtype bf16|f16|f32] [--into original|dequantized] [--unload]
  jobs      list [--state queued,running,...] [--limit N] | get ID [--history] | watch ID [--after N] | cancel ID | resume ID
  adapters  list [--loaded] | get ID | load ID | unload ID | delete ID | import ID DIR | export ID DIR
  datasets  list | upload FILE.jsonl [--dataset-id ID] | delete ID

  --addr defaults to $TUNESERVE_ADDR or 127.0.0.1:50051, --api-key to $TUNESERVE_API_KEY (--token / $TUNESERVE_TOKEN,
  the older names, still work). The connection is TLS (the system's CAs, or --tls-ca / $TUNESERVE_TLS_CA; a client
  certificate with --tls-cert/--tls-key) unless --plaintext or TUNESERVE_PLAINTEXT=1. --timeout is the deadline of
  each call (default 30 s for single calls, none for streams). --json prints one JSON object per event, item or
  result (generate: one object at the end). Unset training flags take the server's defaults (see TrainingConfig).
`;

/** `tuneserve remote <command> ...`. */
export async function remoteCommand(argv: string[], io: CommandIo = processIo): Promise<void> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    io.stdout.write(REMOTE_USAGE);
    if (name === undefined) throw new EngineError('INVALID_ARGUMENT', 'missing remote command', { field: 'command' });
    return;
  }
  if (!Object.hasOwn(SUBCOMMANDS, name)) {
    throw new EngineError('INVALID_ARGUMENT', `unknown remote command ${JSON.stringify(name)} (${Object.keys(SUBCOMMANDS).join(', ')})`, { field: 'command' });
  }
  const subcommand = SUBCOMMANDS[name as keyof typeof SUBCOMMANDS];
  const { values, positionals } = parseArgs({ args: rest, strict: true, allowPositionals: true, options: { ...COMMON_FLAGS, ...subcommand.flags } });
  const flags = values as Flags;
  if (positionals.length > MAX_POSITIONALS[name as keyof typeof SUBCOMMANDS]) {
    throw new EngineError('INVALID_ARGUMENT', `unexpected argument ${JSON.stringify(positionals.at(-1))}`, { field: 'command' });
  }
  const timeoutSeconds = float(flags, 'timeout');
  if (timeoutSeconds !== undefined && timeoutSeconds <= 0) throw new EngineError('INVALID_ARGUMENT', '--timeout must be above 0 seconds', { field: 'timeout' });
  const address = text(flags, 'addr') ?? process.env.TUNESERVE_ADDR ?? '127.0.0.1:50051';
  const clients = createClients(address, connectionOptions(flags));
  try {
    await subcommand.run({
      clients, flags, positionals, io, json: flags.json === true,
      unaryTimeoutMs: timeoutSeconds !== undefined ? timeoutSeconds * 1000 : DEFAULT_UNARY_TIMEOUT_MS,
      streamTimeoutMs: timeoutSeconds !== undefined ? timeoutSeconds * 1000 : null,
    });
  } catch (error) {
    throw cliError(error);
  } finally {
    clients.close();
  }
}
