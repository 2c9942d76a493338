# Dockerfile: the tuneserve server image (gRPC service over the native C++/CUDA engine).
# NOT BUILT IN THIS REPOSITORY'S CI OR DEV MACHINES: they have no Docker engine. Build it where one is:
#   docker build -t <registry>/tuneserve:0.1.0 .
# Stage 1 compiles the addon with nvcc present (CUDA kernels for sm_80/sm_89/sm_90a + PTX) and the
# TypeScript; stage 2 is the CUDA runtime image (cuBLAS/cuBLASLt, which the engine dlopens) with
# Node 20, running `node bin/tuneserve.js serve` as the non-root user 10001. No model weights are
# baked in: the base model is mounted read-only at run time (or the built-in demo model is made
# under the data root on first start).

ARG CUDA_VERSION=13.0.2
ARG UBUNTU=ubuntu24.04
ARG NODE_IMAGE=node:20-bookworm-slim

# Node 20 (binary, npm and headers) comes from the official image; its glibc (2.36) is older than
# Ubuntu 24.04's, so the binary runs unchanged on the CUDA images.
FROM ${NODE_IMAGE} AS node

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm
COPY --from=node /usr/local/include/node /usr/local/include/node
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
 && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx
# scripts/find-cuda.cjs looks at CUDA_HOME first; node-gyp builds against the copied Node headers.
ENV CUDA_HOME=/usr/local/cuda \
    npm_config_nodedir=/usr/local \
    npm_config_update_notifier=false \
    npm_config_fund=false
WORKDIR /src
# .dockerignore lets in only what the build needs (sources, lockfile, protos, demo data).
COPY . .
# npm ci runs the package's install script (node-gyp rebuild, with nvcc) and prepare (tsc -> dist/);
# then the dev dependencies are dropped and the addon is loaded once (no GPU needed to load it).
RUN npm ci \
 && test -f build/Release/tuneserve_native.node \
 && test -f dist/cli/main.js \
 && npm prune --omit=dev \
 && node -e "require('./build/Release/tuneserve_native.node')"

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
# tini: PID 1 that forwards SIGTERM (the server drains on it) and reaps children.
# libopenblas0-pthread: the CPU backend's optional BLAS (dlopen of libopenblas.so.0).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini libopenblas0-pthread \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tuneserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin tuneserve \
 && mkdir -p /var/lib/tuneserve /models \
 && chown 10001:10001 /var/lib/tuneserve
COPY --from=node /usr/local/bin/node /usr/local/bin/node
WORKDIR /app
# The application is owned by root and read-only to the server user.
COPY --from=build /src/package.json ./package.json
COPY --from=build /src/bin ./bin
COPY --from=build /src/dist ./dist
COPY --from=build /src/proto ./proto
COPY --from=build /src/data ./data
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/build/Release/tuneserve_native.node ./build/Release/tuneserve_native.node
ENV NODE_ENV=production \
    HOME=/tmp
USER 10001:10001
VOLUME ["/var/lib/tuneserve"]
# 50051: gRPC (and grpc.health.v1); 9464: Prometheus metrics when --metrics-port 9464 is given.
EXPOSE 50051 9464
ENTRYPOINT ["/usr/bin/tini", "--", "node", "/app/bin/tuneserve.js"]
# Plaintext, asked for explicitly, for a local trial or behind a mesh; give --tls-cert/--tls-key (and
# --auth-keys-file) in production. The Helm chart passes its own arguments.
CMD ["serve", "--data-root", "/var/lib/tuneserve", "--port", "50051", "--plaintext"]
