// tuneserve.v1.ModelService: GetModelInfo.

import { Quantization, type GetModelInfoRequest, type GetModelInfoResponse, type ModelServiceServer } from '../gen/tuneserve/v1/model.js';
import type { ServiceContext } from './context.js';
import type { RpcRunner } from './rpc.js';
import { toServingStats } from './wire.js';

const SERVICE = 'ModelService';

/** The ModelService handlers. */
export function modelService(context: ServiceContext, rpc: RpcRunner): ModelServiceServer {
  return {
    getModelInfo: rpc.unary<GetModelInfoRequest, GetModelInfoResponse>(SERVICE, 'GetModelInfo', async () => {
      const engine = context.engine();
      const info = engine.modelInfo();
      const { config, memory } = info;
      return {
        modelName: info.name,
        architecture: {
          hiddenSize: config.hiddenSize,
          intermediateSize: config.intermediateSize,
          numLayers: config.numLayers,
          numAttentionHeads: config.numAttentionHeads,
          numKeyValueHeads: config.numKeyValueHeads,
          headDim: config.headDim,
          vocabSize: config.vocabSize,
          maxPositionEmbeddings: config.maxPositionEmbeddings,
          ropeTheta: config.ropeTheta,
          ropeScalingType: config.ropeScalingType ?? '',
          rmsNormEps: config.rmsNormEps,
          tieWordEmbeddings: config.tieWordEmbeddings,
        },
        sourceDtype: info.sourceDtype,
        quantization: info.quantization === 'nf4' ? Quantization.QUANTIZATION_NF4 : Quantization.QUANTIZATION_NONE,
        device: info.device,
        memory: {
          weightsBytes: memory.weightsBytes,
          adapterPoolBytes: memory.adapterPoolBytes,
          kvCacheBytes: memory.kvCacheBytes,
          trainingWorkspaceBytes: memory.trainingWorkspaceBytes,
          deviceTotalBytes: memory.deviceTotalBytes,
          deviceFreeBytes: memory.deviceFreeBytes,
          stepWorkspaceBytes: memory.stepWorkspaceBytes,
          backendScratchBytes: memory.backendScratchBytes,
          kvCacheBlocks: memory.kvCacheBlocks,
          kvBlockSize: memory.kvBlockSize,
          kvCacheBlocksUsed: memory.kvCacheBlocksUsed,
          trainingPlan: memory.trainingPlan,
        },
        computeDtype: info.computeDtype,
        baseFingerprint: info.fingerprint,
        limits: {
          maxSeqLen: info.maxSeqLen,
          adapterSlots: info.adapterSlots,
          adapterSlotsUsed: engine.loadedAdapters().length,
          maxConcurrentGenerations: context.limits.maxConcurrentGenerations,
          maxQueuedJobs: context.limits.maxQueuedJobs,
          maxDatasetBytes: context.limits.maxDatasetBytes,
          maxInlineDatasetBytes: context.limits.maxInlineDatasetBytes,
          maxAdapterBytes: context.limits.maxAdapterBytes,
        },
        scheduling: info.scheduling,
        schedulingPolicy: { ...info.schedulingPolicy },
        scheduler: { ...info.scheduler },
        adapterPool: {
          deviceSlots: info.pool.deviceSlots,
          resident: info.pool.resident,
          pinned: info.pool.pinned,
          hostBytes: info.pool.hostBytes,
          hostBudgetBytes: info.pool.hostBudgetBytes,
          waitingRequests: info.pool.waitingRequests,
          stats: toServingStats(info.pool.stats),
        },
        eosTokenIds: [...engine.tokenizer.eosIds],
        hasChatTemplate: engine.tokenizer.hasChatTemplate,
        serverVersion: context.serverVersion,
      };
    }),
  };
}
