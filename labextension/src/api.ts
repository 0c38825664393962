/** The gpulab REST API of this Jupyter server (`<base url>gpulab/api/v1`), typed. */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export const TERMINAL_STATES = ['succeeded', 'failed', 'cancelled', 'timed_out'];

export interface IJob {
  id: string;
  name: string;
  owner: string;
  kind: string;
  state: string;
  state_reason: string;
  pool: string;
  resources: { gpus: number; cpus: number; memory: number | null; pool: string };
  attempt: number;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  exit_code: number | null;
  progress: { step: number | null; total: number | null; fraction: number | null; metrics: Record<string, unknown> };
  mlflow_run_id: string | null;
  attestation_node: string | null;
}

export interface ITensor {
  name: string;
  datatype: string;
  shape: number[];
}

export interface IModel {
  name: string;
  owner: string | null;
  backend: string | null;
  ready: boolean;
  versions: { version: number; state: string; source?: string; deployed_by?: string; deployed_at?: string }[];
  inputs: ITensor[];
  outputs: ITensor[];
}

export interface INode {
  node: string;
  valid: boolean;
  problem: string | null;
  user: string | null;
  verified_at: string | null;
  expires_at: string | null;
  revoked: boolean;
  last_reason: string;
  devices: Record<string, unknown>;
}

export interface IStatus {
  user: string;
  gpus: 'none' | { index: number; name: string; uuid: string }[];
  services: { jobs: string | null; mlflow_ui: string | null };
  breakers: { name: string; state: string; last_error?: string | null }[];
}

export interface IWhoAmI {
  name: string;
  admin: boolean;
  groups: string[];
  scopes: string[];
}

/** A refusal or failure of the API; `message` is the server's, `field` names what to fix. */
export class APIError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly field: string | null = null
  ) {
    super(message);
  }
}

/** Call the API; JSON bodies are parsed, errors become {@link APIError}. */
export async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<Response & { json(): Promise<T> }> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'gpulab/api/v1', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new APIError(0, `the gpulab API cannot be reached: ${error}`);
  }
  if (!response.ok) {
    let message = `HTTP ${response.status} ${response.statusText}`;
    let field: string | null = null;
    try {
      const body = await response.json();
      message = body?.error?.message ?? message;
      field = body?.error?.field ?? null;
    } catch {
      // not JSON: keep the status line
    }
    throw new APIError(response.status, message, field);
  }
  return response;
}

/** GET a JSON resource. */
export async function getJSON<T>(path: string): Promise<T> {
  return (await requestAPI<T>(path)).json();
}

/** POST (or DELETE) and return the JSON answer, if any. */
export async function send<T>(method: 'POST' | 'DELETE', path: string, body?: unknown): Promise<T | null> {
  const init: RequestInit = { method };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = { 'Content-Type': 'application/json' };
  }
  const response = await requestAPI<T>(path, init);
  return response.status === 204 ? null : response.json();
}

/**
 * Follow a job's log as server-sent events from `offset`; `onText` gets each chunk, the promise
 * resolves with the final state when the job ends (or `null` when `signal` aborts).
 */
export async function followLogs(
  jobId: string,
  offset: number,
  onText: (text: string) => void,
  signal: AbortSignal
): Promise<string | null> {
  const response = await requestAPI(`jobs/${jobId}/logs?follow=true&offset=${offset}`, { signal });
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        return null;
      }
      buffer += value;
      let end: number;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event.name === 'log') {
          onText(event.data.text);
        } else if (event.name === 'end') {
          return event.data.state;
        } else if (event.name === 'closed') {
          // the service's time limit or a token re-check: follow again from where it stopped, or say why not
          if (event.data.code === 'revoked') {
            throw new Error(event.data.message);
          }
          return followLogs(jobId, event.data.offset, onText, signal);
        }
      }
    }
  } catch (error) {
    if (signal.aborted) {
      return null;
    }
    throw error;
  } finally {
    reader.releaseLock();
  }
}

function parseEvent(block: string): { name: string; data: any } {
  let name = 'message';
  const data: string[] = [];
  for (const line of block.split('\n')) {
    if (line.startsWith('event:')) {
      name = line.slice(6).trim();
    } else if (line.startsWith('data:')) {
      data.push(line.slice(5).trim());
    }
  }
  return { name, data: data.length ? JSON.parse(data.join('\n')) : null };
}
