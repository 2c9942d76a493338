// Entry point of the `tuneserve` command line: dispatches to the engine commands (make-model, train,
// generate, merge) and the service commands. Errors print one line with their code and exit 1.

const USAGE = `usage: tuneserve <command> [flags]

engine commands:
  make-model --preset tiny|small|llama3-8b-shape --out DIR [--seed N] [--layers N] [--dtype float32|bfloat16|float16]
  train      --model DIR --data FILE.jsonl --out ADAPTER_DIR [--rank --alpha --dropout --targets LIST|all-linear --rslora
             --lr --steps --epochs --batch-size --grad-accum --max-seq-len --scheduler constant|linear|cosine
             --warmup-steps --weight-decay --max-grad-norm --seed --no-shuffle --init-adapter DIR
             --no-gradient-checkpointing --checkpoint-dir DIR --checkpoint-every N --resume CHECKPOINT
             --nonfinite-policy fail|skip|rollback --spike-factor X --spike-policy fail|skip|rollback --packing auto|on|off
             --quant nf4|none --device cpu|cuda|auto --cuda-compute bf16|f32 --threads N --json]
  generate   --model DIR [--adapter DIR] (--prompt TEXT [--chat] | --prompt-ids 1,2,3) [--max-tokens --temperature
             --top-k --top-p --repetition-penalty --seed --ignore-eos --quant --device --threads --json]
  merge      --model DIR --adapter DIR --out DIR [--dtype bf16|f16|f32] [--into original|dequantized] [--no-fidelity --quant --json]

service commands:
  serve      [--config FILE.json] [--print-config] [--model DIR] [--data-root DIR] [--port 50051]
             (--plaintext | --tls-cert PEM --tls-key PEM [--tls-client-ca PEM]) [--auth-keys-file keys.json]
             [--metrics-port N] [--status-port N] [--log-level info] ...   (tuneserve serve --help lists every setting,
             its TUNESERVE_* variable and default; no --model: the built-in demo model)
  keys       create --id NAME --tenant TENANT --scopes generate,train,admin [--file keys.json]   (a new API key)
  remote     <info|train|generate|merge|jobs|adapters|datasets> [--addr host:port] [--token T] [--timeout S] [--json] ...
             (tuneserve remote --help lists every subcommand and flag; defaults from TUNESERVE_ADDR / TUNESERVE_TOKEN)
  demo       [--data-root DIR] [--port N] [--keep] [--threads N]   (npm run demo: trains two adapters, generates, swaps, merges over gRPC)
`;

// Loaded on demand: the engine commands never load gRPC, and startup stays quick.
type Command = (argv: string[]) => Promise<void>;
const COMMANDS: Record<string, () => Promise<Command>> = {
  'make-model': async () => (await import('./engine-commands.js')).makeModelCommand,
  train: async () => (await import('./engine-commands.js')).trainCommand,
  generate: async () => (await import('./engine-commands.js')).generateCommand,
  merge: async () => (await import('./engine-commands.js')).mergeCommand,
  serve: async () => { const m = await import('./serve-command.js'); return (argv) => m.serveCommand(argv); },
  keys: async () => { const m = await import('./keys-command.js'); return (argv) => m.keysCommand(argv); },
  remote: async () => { const m = await import('./remote-command.js'); return (argv) => m.remoteCommand(argv); },
  demo: async () => { const m = await import('./demo-command.js'); return (argv) => m.demoCommand(argv); },
};

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(USAGE);
    return command ? 0 : 2;
  }
  const load = COMMANDS[command];
  if (!load) {
    process.stderr.write(`tuneserve: unknown command ${JSON.stringify(command)}\n\n${USAGE}`);
    return 2;
  }
  try {
    const run = await load();
    await run(rest);
    return 0;
  } catch (e) {
    const err = e as Error & { code?: string };
    process.stderr.write(`tuneserve ${command}: ${err.code ? `[${err.code}] ` : ''}${err.message}\n`);
    if (process.env.TUNESERVE_DEBUG) process.stderr.write(`${err.stack}\n`);
    return 1;
  }
}
