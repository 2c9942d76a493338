// Opt-in gRPC server reflection (grpc.reflection.v1 and v1alpha) for tools like grpcurl: the
// tuneserve.v1 protos are loaded from proto/ at start, so reflection describes exactly the
// contract that is served.

import type { Server } from '@grpc/grpc-js';
import { readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/** The proto/ folder of the package (same relative place from src/server and dist/server). */
export const PROTO_ROOT = fileURLToPath(new URL('../../proto', import.meta.url));

/** Adds the reflection service for every tuneserve.v1 file to `server`. */
export async function addReflection(server: Server): Promise<void> {
  const [{ ReflectionService }, protoLoader] = await Promise.all([import('@grpc/reflection'), import('@grpc/proto-loader')]);
  const files = readdirSync(`${PROTO_ROOT}/tuneserve/v1`)
    .filter((name) => name.endsWith('.proto'))
    .map((name) => `tuneserve/v1/${name}`);
  const definition = protoLoader.loadSync(files, { includeDirs: [PROTO_ROOT] });
  new ReflectionService(definition as ConstructorParameters<typeof ReflectionService>[0]).addToServer(server);
}
