// Opaque page tokens for List RPCs: base64url of a small JSON cursor, checked on the way back in.

import { invalidArgument } from './errors.js';

/** Encodes a cursor as a page token. */
export function encodePageToken(cursor: string | number): string {
  return Buffer.from(JSON.stringify({ c: cursor }), 'utf8').toString('base64url');
}

/** Decodes a page token ('' → null); INVALID_ARGUMENT page_token when it is not one of ours. */
export function decodePageToken<T extends string | number>(token: string, kind: 'string' | 'number'): T | null {
  if (token === '') return null;
  try {
    const parsed = JSON.parse(Buffer.from(token, 'base64url').toString('utf8')) as { c?: unknown };
    if (typeof parsed.c === kind) return parsed.c as T;
  } catch {
    // fall through to the error below
  }
  throw invalidArgument('page_token', 'is not a token returned by this server');
}

/** Resolves page_size: 0 → the default; above the maximum → INVALID_ARGUMENT page_size. */
export function pageSize(requested: number, defaultSize: number, maxSize: number): number {
  if (requested === 0) return defaultSize;
  if (requested > maxSize) throw invalidArgument('page_size', `must be at most ${maxSize}`);
  return requested;
}

/** One page of an id-ordered list, and the token of the next page. */
export function pageById<T>(items: T[], idOf: (item: T) => string, token: string, size: number): { page: T[]; next: string } {
  const after = decodePageToken<string>(token, 'string');
  const rest = after === null ? items : items.filter((item) => idOf(item) > after);
  const page = rest.slice(0, size);
  const last = page[page.length - 1];
  return { page, next: rest.length > size && last !== undefined ? encodePageToken(idOf(last)) : '' };
}
