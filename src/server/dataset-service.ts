// tuneserve.v1.DatasetService: UploadDataset (client streaming), GetDataset, ListDatasets,
// DeleteDataset.

import type {
  DatasetServiceServer,
  DeleteDatasetRequest,
  DeleteDatasetResponse,
  GetDatasetRequest,
  GetDatasetResponse,
  ListDatasetsRequest,
  ListDatasetsResponse,
  UploadDatasetRequest,
  UploadDatasetResponse,
} from '../gen/tuneserve/v1/datasets.js';
import { MAX_CHUNK_BYTES, type ServiceContext } from './context.js';
import { invalidArgument } from './errors.js';
import { requireId } from './ids.js';
import { pageById, pageSize } from './paging.js';
import { canUse, requireManage, requireUse } from './auth.js';
import type { RpcRunner } from './rpc.js';
import { toDataset } from './wire.js';

const SERVICE = 'DatasetService';

/** The chunks after the header; INVALID_ARGUMENT for a second header or an oversize chunk. */
async function* chunksOf(messages: AsyncGenerator<UploadDatasetRequest>): AsyncGenerator<Uint8Array> {
  for await (const message of messages) {
    if (message.header !== undefined) throw invalidArgument('header', 'must be sent once, in the first message only');
    const chunk = message.chunk;
    if (chunk === undefined) throw invalidArgument('part', 'must be set (header or chunk)');
    if (chunk.length > MAX_CHUNK_BYTES) throw invalidArgument('chunk', `must be at most ${MAX_CHUNK_BYTES} bytes`);
    yield chunk;
  }
}

/** The DatasetService handlers. Reads need the dataset's tenant or sharing; deletes need its tenant. */
export function datasetService(context: ServiceContext, rpc: RpcRunner): DatasetServiceServer {
  const { datasets, queue } = context;
  return {
    uploadDataset: rpc.clientStream<UploadDatasetRequest, UploadDatasetResponse>(SERVICE, 'UploadDataset', async (messages, call) => {
      const first = await messages.next();
      const header = first.done ? undefined : first.value.header;
      if (header === undefined) throw invalidArgument('header', 'must be the first message of the stream');
      const datasetId = requireId(header.datasetId, 'header.dataset_id');
      call.annotate({ 'tuneserve.dataset': datasetId });
      const upload = { datasetId, sizeBytes: header.sizeBytes, sha256: header.sha256, tenant: call.principal.tenant, shared: header.shared };
      datasets.checkHeader(upload);
      const record = await datasets.upload(upload, chunksOf(messages), context.engine().modelInfo().config.vocabSize);
      return { dataset: toDataset(record) };
    }),

    getDataset: rpc.unary<GetDatasetRequest, GetDatasetResponse>(SERVICE, 'GetDataset', async (request, call) => {
      const datasetId = requireId(request.datasetId, 'dataset_id');
      const record = await datasets.get(datasetId);
      requireUse(call.principal, 'dataset', datasetId, record);
      return { dataset: toDataset(record) };
    }),

    listDatasets: rpc.unary<ListDatasetsRequest, ListDatasetsResponse>(SERVICE, 'ListDatasets', async (request, call) => {
      const size = pageSize(request.pageSize, 100, 1000);
      const visible = (await datasets.list()).filter((d) => canUse(call.principal, d));
      const { page, next } = pageById(visible, (d) => d.datasetId, request.pageToken, size);
      return { datasets: page.map(toDataset), nextPageToken: next };
    }),

    deleteDataset: rpc.unary<DeleteDatasetRequest, DeleteDatasetResponse>(SERVICE, 'DeleteDataset', async (request, call) => {
      const datasetId = requireId(request.datasetId, 'dataset_id');
      requireManage(call.principal, 'dataset', datasetId, await datasets.get(datasetId));
      await datasets.delete(datasetId, (id) => queue.datasetInUse(id));
      return {};
    }),
  };
}
