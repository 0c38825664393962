/** Pieces the tabs share: polling a resource while the panel is visible, errors, relative times. */

import * as React from 'react';

import { APIError, send } from './api';

export const POLL_MS = 2000;

/**
 * `[value, error, refresh]` of `load()`, run now and every {@link POLL_MS} while `visible()`;
 * reloads when `deps` change.
 */
export function usePolling<T>(
  load: () => Promise<T>,
  visible: () => boolean,
  deps: React.DependencyList = []
): [T | null, string | null, () => void] {
  const [value, setValue] = React.useState<T | null>(null);
  const [error, setError] = React.useState<string | null>(null);
  const [tick, setTick] = React.useState(0);
  React.useEffect(() => {
    let live = true;
    const run = async () => {
      try {
        const result = await load();
        if (live) {
          setValue(result);
          setError(null);
        }
      } catch (e) {
        if (live) {
          setError(e instanceof APIError ? e.message : String(e));
        }
      }
    };
    run();
    const timer = setInterval(() => visible() && run(), POLL_MS);
    return () => {
      live = false;
      clearInterval(timer);
    };
  }, [...deps, tick]);
  return [value, error, () => setTick(t => t + 1)];
}

/** A button's call of the API: `[error, act]`; `act` sends, keeps the refusal as "what: why", then refreshes. */
export type Act = (what: string, method: 'POST' | 'PATCH' | 'DELETE', path: string, body?: unknown) => Promise<void>;

export function useAct(refresh: () => void): [string | null, Act] {
  const [error, setError] = React.useState<string | null>(null);
  const act: Act = async (what, method, path, body) => {
    setError(null);
    try {
      await send(method, path, body);
    } catch (e) {
      setError(`${what}: ${e instanceof APIError ? e.message : e}`);
    }
    refresh();
  };
  return [error, act];
}

/** An error as the user reads it, the field at fault first where the server named one, and that field. */
export function fieldError(e: unknown): { message: string; field: string | null } {
  if (e instanceof APIError) {
    const message = e.field && !e.message.startsWith(e.field) ? `${e.field}: ${e.message}` : e.message;
    return { message, field: e.field };
  }
  return { message: e instanceof Error ? e.message : String(e), field: null };
}

export function ErrorLine(props: { error: string | null }): JSX.Element | null {
  return props.error ? (
    <div className="jp-gpulab-error" role="alert">
      {props.error}
    </div>
  ) : null;
}

/** "5s ago", "3m ago", "2h ago", "4d ago". */
export function ago(iso: string): string {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  for (const [unit, size] of [
    ['d', 86400],
    ['h', 3600],
    ['m', 60]
  ] as [string, number][]) {
    if (seconds >= size) {
      return `${Math.floor(seconds / size)}${unit} ago`;
    }
  }
  return `${Math.floor(seconds)}s ago`;
}

/** "1 GPU", "2 GPUs". */
export function plural(count: number, noun: string): string {
  return `${count} ${noun}${count === 1 ? '' : 's'}`;
}
