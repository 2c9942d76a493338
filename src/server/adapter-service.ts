// tuneserve.v1.AdapterService: ListAdapters, GetAdapter, LoadAdapter, UnloadAdapter,
// DeleteAdapter, ImportAdapter, ExportAdapter, MergeAndUnload.

import type {
  AdapterServiceServer,
  DeleteAdapterRequest,
  DeleteAdapterResponse,
  ExportAdapterRequest,
  ExportAdapterResponse,
  GetAdapterRequest,
  GetAdapterResponse,
  ImportAdapterRequest,
  ImportAdapterResponse,
  ListAdaptersRequest,
  ListAdaptersResponse,
  LoadAdapterRequest,
  LoadAdapterResponse,
  MergeAndUnloadRequest,
  MergeAndUnloadResponse,
  UnloadAdapterRequest,
  UnloadAdapterResponse,
} from '../gen/tuneserve/v1/adapters.js';
import type { AdapterView } from './adapter-registry.js';
import { exportAdapter, importAdapter } from './adapter-transfer.js';
import type { ServiceContext } from './context.js';
import { requireId } from './ids.js';
import { mergeAndUnload } from './merge.js';
import { pageById, pageSize } from './paging.js';
import type { RpcRunner } from './rpc.js';
import { toAdapter } from './wire.js';

const SERVICE = 'AdapterService';

/** The AdapterService handlers. */
export function adapterService(context: ServiceContext, rpc: RpcRunner): AdapterServiceServer {
  const { adapters, queue } = context;
  const wire = (view: AdapterView) => toAdapter(view, context.engine().modelInfo().fingerprint);

  return {
    listAdapters: rpc.unary<ListAdaptersRequest, ListAdaptersResponse>(SERVICE, 'ListAdapters', async (request) => {
      const size = pageSize(request.pageSize, 100, 1000);
      const all = (await adapters.list()).filter((a) => !request.loadedOnly || a.loaded);
      const { page, next } = pageById(all, (a) => a.adapterId, request.pageToken, size);
      return { adapters: page.map(wire), nextPageToken: next };
    }),

    getAdapter: rpc.unary<GetAdapterRequest, GetAdapterResponse>(SERVICE, 'GetAdapter', async (request) => {
      const adapterId = requireId(request.adapterId, 'adapter_id');
      return { adapter: wire(await adapters.get(adapterId)) };
    }),

    loadAdapter: rpc.unary<LoadAdapterRequest, LoadAdapterResponse>(SERVICE, 'LoadAdapter', async (request) => {
      const adapterId = requireId(request.adapterId, 'adapter_id');
      await adapters.load(adapterId);
      return { adapter: wire(await adapters.get(adapterId)) };
    }),

    unloadAdapter: rpc.unary<UnloadAdapterRequest, UnloadAdapterResponse>(SERVICE, 'UnloadAdapter', async (request) => {
      const adapterId = requireId(request.adapterId, 'adapter_id');
      await adapters.unload(adapterId);
      return { adapter: wire(await adapters.get(adapterId)) };
    }),

    deleteAdapter: rpc.unary<DeleteAdapterRequest, DeleteAdapterResponse>(SERVICE, 'DeleteAdapter', async (request) => {
      const adapterId = requireId(request.adapterId, 'adapter_id');
      await adapters.delete(adapterId, (id) => queue.adapterBlocker(id));
      return {};
    }),

    importAdapter: rpc.clientStream<ImportAdapterRequest, ImportAdapterResponse>(SERVICE, 'ImportAdapter', async (messages) => {
      return { adapter: wire(await importAdapter(messages, context)) };
    }),

    exportAdapter: rpc.serverStream<ExportAdapterRequest, ExportAdapterResponse>(SERVICE, 'ExportAdapter', async (request, writer) => {
      await exportAdapter(request, writer, context);
    }),

    mergeAndUnload: rpc.serverStream<MergeAndUnloadRequest, MergeAndUnloadResponse>(
      SERVICE,
      'MergeAndUnload',
      async (request, writer, _call, watch) => {
        await mergeAndUnload(request, writer, watch, context);
      },
    ),
  };
}
