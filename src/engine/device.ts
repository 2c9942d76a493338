// Chooses the compute device. `cuda` needs a build with the CUDA backend and a device on which the
// probe's kernel ran; `auto` takes CUDA when that holds and otherwise the CPU backend, with one log
// line saying why; `cpu` always takes the CPU backend.

import { EngineError } from './errors.js';
import { native } from './native.js';

export type DeviceChoice = 'cpu' | 'cuda' | 'auto';
export type Device = 'cpu' | 'cuda';

/** Why CUDA cannot be used here, or null when it can. */
function cudaUnusable(): string | null {
  const probe = native().cudaProbe();
  if (!probe.compiled) return 'this build has no CUDA support (nvcc was not found at build time)';
  const gpu = probe.deviceCount > 0 ? probe.devices[0] : undefined;
  if (!gpu) return `no usable CUDA device (${probe.error || 'none found'})`;
  if (!gpu.kernelOk) return `CUDA device ${gpu.name} does not run this build's kernels (${gpu.error})`;
  return null;
}

export function resolveDevice(choice: DeviceChoice, log: (line: string) => void = (l) => process.stderr.write(`${l}\n`)): Device {
  if (choice === 'cpu') return 'cpu';
  if (choice !== 'cuda' && choice !== 'auto') throw new EngineError('INVALID_ARGUMENT', `device must be cpu, cuda or auto, got ${String(choice)}`, { field: 'device' });
  const why = cudaUnusable();
  if (why === null) return 'cuda';
  if (choice === 'cuda') throw new EngineError('DEVICE_UNAVAILABLE', `--device cuda: ${why}; use --device cpu or auto`, { field: 'device' });
  log(`tuneserve: using the CPU backend (${why})`);
  return 'cpu';
}
