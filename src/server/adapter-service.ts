// tuneserve.v1.AdapterService: ListAdapters, GetAdapter, LoadAdapter, UnloadAdapter,
// DeleteAdapter, SetAdapterShared, ImportAdapter, ExportAdapter, MergeAndUnload, the alias RPCs
// (SetAdapterAlias, RollbackAdapterAlias, DeleteAdapterAlias) and PinAdapter.

import type {
  AdapterServiceServer,
  DeleteAdapterAliasRequest,
  DeleteAdapterAliasResponse,
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
  PinAdapterRequest,
  PinAdapterResponse,
  RollbackAdapterAliasRequest,
  RollbackAdapterAliasResponse,
  SetAdapterAliasRequest,
  SetAdapterAliasResponse,
  SetAdapterSharedRequest,
  SetAdapterSharedResponse,
  UnloadAdapterRequest,
  UnloadAdapterResponse,
} from '../gen/tuneserve/v1/adapters.js';
import type { AdapterView } from './adapter-registry.js';
import { exportAdapter, importAdapter } from './adapter-transfer.js';
import type { ServiceContext } from './context.js';
import { requireAdapterRef, requireAlias, requireId } from './ids.js';
import { invalidArgument } from './errors.js';
import { mergeAndUnload } from './merge.js';
import { pageById, pageSize } from './paging.js';
import { canUse, requireManage, requireUse } from './auth.js';
import type { CallContext, RpcRunner } from './rpc.js';
import { toAdapter } from './wire.js';

const SERVICE = 'AdapterService';

/** The AdapterService handlers. Reads need the adapter's tenant or sharing; changes need its tenant. */
export function adapterService(context: ServiceContext, rpc: RpcRunner): AdapterServiceServer {
  const { adapters, queue } = context;
  const wire = (view: AdapterView) => toAdapter(view, context.engine().modelInfo().fingerprint);
  /** The adapter, when the caller may use it (PERMISSION_DENIED otherwise). */
  const usable = async (call: CallContext, adapterId: string): Promise<AdapterView> => {
    call.annotate({ 'tuneserve.adapter': adapterId });
    const view = await adapters.get(adapterId);
    requireUse(call.principal, 'adapter', adapterId, view);
    return view;
  };
  const manageable = async (call: CallContext, adapterId: string): Promise<AdapterView> => {
    call.annotate({ 'tuneserve.adapter': adapterId });
    const view = await adapters.get(adapterId);
    requireManage(call.principal, 'adapter', adapterId, view);
    return view;
  };

  return {
    listAdapters: rpc.unary<ListAdaptersRequest, ListAdaptersResponse>(SERVICE, 'ListAdapters', async (request, call) => {
      const size = pageSize(request.pageSize, 100, 1000);
      const all = (await adapters.list()).filter((a) => (!request.loadedOnly || a.loaded) && canUse(call.principal, a));
      const { page, next } = pageById(all, (a) => a.adapterId, request.pageToken, size);
      return { adapters: page.map(wire), nextPageToken: next };
    }),

    getAdapter: rpc.unary<GetAdapterRequest, GetAdapterResponse>(SERVICE, 'GetAdapter', async (request, call) => {
      return { adapter: wire(await usable(call, requireId(request.adapterId, 'adapter_id'))) };
    }),

    loadAdapter: rpc.unary<LoadAdapterRequest, LoadAdapterResponse>(SERVICE, 'LoadAdapter', async (request, call) => {
      const ref = requireAdapterRef(request.adapterId, 'adapter_id');
      await usable(call, ref.adapterId);
      await adapters.load(ref, call.signal);
      return { adapter: wire(await adapters.get(ref.adapterId)) };
    }),

    unloadAdapter: rpc.unary<UnloadAdapterRequest, UnloadAdapterResponse>(SERVICE, 'UnloadAdapter', async (request, call) => {
      const ref = requireAdapterRef(request.adapterId, 'adapter_id');
      await manageable(call, ref.adapterId);
      await adapters.unload(ref);
      return { adapter: wire(await adapters.get(ref.adapterId)) };
    }),

    setAdapterAlias: rpc.unary<SetAdapterAliasRequest, SetAdapterAliasResponse>(SERVICE, 'SetAdapterAlias', async (request, call) => {
      const adapterId = requireId(request.adapterId, 'adapter_id');
      const alias = requireAlias(request.alias, 'alias');
      if (request.version < 1) throw invalidArgument('version', 'must be a version number, 1 or more');
      await manageable(call, adapterId);
      return { adapter: wire(await adapters.setAlias(adapterId, alias, request.version)) };
    }),

    rollbackAdapterAlias: rpc.unary<RollbackAdapterAliasRequest, RollbackAdapterAliasResponse>(SERVICE, 'RollbackAdapterAlias', async (request, call) => {
      const adapterId = requireId(request.adapterId, 'adapter_id');
      const alias = requireAlias(request.alias, 'alias');
      await manageable(call, adapterId);
      return { adapter: wire(await adapters.rollbackAlias(adapterId, alias)) };
    }),

    deleteAdapterAlias: rpc.unary<DeleteAdapterAliasRequest, DeleteAdapterAliasResponse>(SERVICE, 'DeleteAdapterAlias', async (request, call) => {
      const adapterId = requireId(request.adapterId, 'adapter_id');
      const alias = requireAlias(request.alias, 'alias');
      await manageable(call, adapterId);
      return { adapter: wire(await adapters.deleteAlias(adapterId, alias)) };
    }),

    pinAdapter: rpc.unary<PinAdapterRequest, PinAdapterResponse>(SERVICE, 'PinAdapter', async (request, call) => {
      const ref = requireAdapterRef(request.adapterId, 'adapter_id');
      await manageable(call, ref.adapterId);
      await adapters.pin(ref, request.pinned, call.signal);
      return { adapter: wire(await adapters.get(ref.adapterId)) };
    }),

    deleteAdapter: rpc.unary<DeleteAdapterRequest, DeleteAdapterResponse>(SERVICE, 'DeleteAdapter', async (request, call) => {
      const adapterId = requireId(request.adapterId, 'adapter_id');
      await manageable(call, adapterId);
      await adapters.delete(adapterId, (id) => queue.adapterBlocker(id));
      return {};
    }),

    setAdapterShared: rpc.unary<SetAdapterSharedRequest, SetAdapterSharedResponse>(SERVICE, 'SetAdapterShared', async (request, call) => {
      const adapterId = requireId(request.adapterId, 'adapter_id');
      await manageable(call, adapterId);
      return { adapter: wire(await adapters.setShared(adapterId, request.shared)) };
    }),

    importAdapter: rpc.clientStream<ImportAdapterRequest, ImportAdapterResponse>(SERVICE, 'ImportAdapter', async (messages, call) => {
      return { adapter: wire(await importAdapter(messages, context, call)) };
    }),

    exportAdapter: rpc.serverStream<ExportAdapterRequest, ExportAdapterResponse>(SERVICE, 'ExportAdapter', async (request, writer, call) => {
      const ref = requireAdapterRef(request.adapterId, 'adapter_id');
      await usable(call, ref.adapterId);
      await exportAdapter(request, ref, writer, context);
    }),

    mergeAndUnload: rpc.serverStream<MergeAndUnloadRequest, MergeAndUnloadResponse>(
      SERVICE,
      'MergeAndUnload',
      async (request, writer, call) => {
        await mergeAndUnload(request, writer, call, context);
      },
    ),
  };
}
