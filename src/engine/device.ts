// Chooses the compute device. The engine's ops run on the CPU backend; the CUDA backend's kernels
// are the next milestone, so a GPU is detected and reported (the addon links the CUDA runtime
// statically and probes it) but model work runs on the CPU, with one log line saying so.

import { EngineError } from './errors.js';
import { native } from './native.js';

export type DeviceChoice = 'cpu' | 'cuda' | 'auto';

export function resolveDevice(choice: DeviceChoice, log: (line: string) => void = (l) => process.stderr.write(`${l}\n`)): 'cpu' {
  if (choice === 'cpu') return 'cpu';
  if (choice !== 'cuda' && choice !== 'auto') throw new EngineError('INVALID_ARGUMENT', `device must be cpu, cuda or auto, got ${String(choice)}`, { field: 'device' });
  const probe = native().cudaProbe();
  const gpu = probe.deviceCount > 0 ? probe.devices[0] : undefined;
  if (choice === 'cuda') {
    const seen = !probe.compiled ? 'this build has no CUDA support (nvcc was not found at build time)'
      : gpu ? `found ${gpu.name}, but this build's CUDA backend has no model kernels yet`
      : `no usable CUDA device (${probe.error || 'none found'})`;
    throw new EngineError('DEVICE_UNAVAILABLE', `--device cuda: ${seen}; use --device cpu or auto`, { field: 'device' });
  }
  const why = !probe.compiled ? 'CUDA not compiled into this build'
    : gpu ? `CUDA device ${gpu.name} found, model kernels for it are not in this build yet`
    : `no CUDA device: ${probe.error || 'none found'}`;
  log(`tuneserve: using the CPU backend (${why})`);
  return 'cpu';
}
