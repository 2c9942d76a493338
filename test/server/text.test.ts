// Stop-sequence matching across deltas and the streaming JSONL row check (the row rules themselves
// are tested on both paths in test/rows.test.ts).

import { describe, expect, it } from 'vitest';
import { JsonlChecker } from '../../src/server/jsonl-check.js';
import { ServiceError } from '../../src/server/errors.js';
import { StopMatcher } from '../../src/server/stop-sequences.js';

describe('StopMatcher', () => {
  it('finds a stop sequence split across deltas and emits nothing of it', () => {
    const matcher = new StopMatcher(['END']);
    const out: string[] = [];
    let stopped = false;
    for (const delta of ['Hello E', 'N', 'D and more']) {
      const result = matcher.push(delta);
      out.push(result.emit);
      if (result.stopped) {
        stopped = true;
        break;
      }
    }
    expect(stopped).toBe(true);
    expect(out.join('')).toBe('Hello ');
  });

  it('releases held-back text that turned out not to be a stop sequence', () => {
    const matcher = new StopMatcher(['END']);
    expect(matcher.push('abcE')).toEqual({ emit: 'abc', stopped: false });
    expect(matcher.push('x')).toEqual({ emit: 'Ex', stopped: false });
    expect(matcher.push('EN')).toEqual({ emit: '', stopped: false });
    expect(matcher.flush()).toBe('EN');
  });

  it('stops at the earliest of several sequences', () => {
    const matcher = new StopMatcher(['zz', 'b']);
    expect(matcher.push('a b zz')).toEqual({ emit: 'a ', stopped: true });
  });

  it('passes everything through without stop sequences', () => {
    expect(new StopMatcher([]).push('anything')).toEqual({ emit: 'anything', stopped: false });
  });
});

describe('JsonlChecker', () => {
  const check = (text: string, chunk = 3): number => {
    const checker = new JsonlChecker('chunk', 300);
    const bytes = Buffer.from(text);
    for (let i = 0; i < bytes.length; i += chunk) checker.push(bytes.subarray(i, i + chunk));
    return checker.finish();
  };

  it('counts rows of every shape, split at any byte', () => {
    const text = [
      '{"text":"héllo"}',
      '',
      '{"prompt":"a","completion":"b"}',
      '{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}',
      '{"input_ids":[1,2,3],"labels":[-100,2,3]}',
    ].join('\n');
    for (const chunk of [1, 2, 7, 1000]) expect(check(text, chunk)).toBe(4);
  });

  it('names the line of a bad row', () => {
    let error: unknown;
    try {
      check('{"text":"ok"}\n{"prompt":"only"}\n');
    } catch (caught) {
      error = caught;
    }
    expect(error).toBeInstanceOf(ServiceError);
    expect((error as ServiceError).message).toContain('line 2');
    expect((error as ServiceError).reason).toBe('INVALID_DATASET');
  });

  it('refuses invalid UTF-8, token ids beyond the vocabulary and empty files', () => {
    const checker = new JsonlChecker('chunk', 300);
    expect(() => checker.push(Buffer.from([0x7b, 0xff, 0x7d]))).toThrow(/UTF-8/);
    expect(() => check('{"input_ids":[1,300]}')).toThrow(/line 1: input_ids\[1\] is 300, not a token id below vocab_size 300/);
    expect(() => check('\n\n')).toThrow(/no rows/);
  });
});
