/** The gpulab REST API of this Jupyter server (`<base url>gpulab/api/v1`), typed. */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import type { components } from './schema/server';

type Schemas = components['schemas'];
export type JobState = Schemas['JobState'];
export type IJob = Schemas['Job'];
export type ITensor = Schemas['Tensor'];
export type IModel = Schemas['Model'];
export type INode = Schemas['AttestationNode'];
export type IStatus = Schemas['Status'];
export type IWhoAmI = Schemas['WhoAmI'];
export type INotebookParameters = Schemas['NotebookParameters'];
export type INotebookParameter = Schemas['NotebookParameter'];
export type INotificationFeed = Schemas['NotificationFeed'];
export type IEndedJob = Schemas['EndedJob'];
export type IEndedPipeline = Schemas['EndedPipeline'];
export type ISchedule = Schemas['Schedule'];
export type IPipeline = Schemas['Pipeline'];
export type IPipelineStep = Schemas['PipelineStepStatus'];
export type INotificationSettings = Schemas['NotificationSettings'];
export type IQuota = Schemas['Quota'];

export const TERMINAL_STATES: JobState[] = ['succeeded', 'failed', 'cancelled', 'timed_out'];

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

/** POST, PUT, PATCH or DELETE, and return the JSON answer, if any. */
export async function send<T>(
  method: 'POST' | 'PUT' | 'PATCH' | 'DELETE',
  path: string,
  body?: unknown
): Promise<T | null> {
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
          onText((event.data as ILogEvents['log']).text);
        } else if (event.name === 'end') {
          return (event.data as ILogEvents['end']).state;
        } else if (event.name === 'closed') {
          // the service's time limit or a token re-check: follow again from where it stopped, or say why not
          const closed = event.data as ILogEvents['closed'];
          if (closed.code === 'revoked') {
            throw new Error(closed.message);
          }
          return followLogs(jobId, closed.offset, onText, signal);
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

/** The data of each server-sent event of a followed log (GET /jobs/{id}/logs?follow=true). */
interface ILogEvents {
  log: { offset: number; text: string };
  end: { state: JobState };
  closed: { code: string; message: string; offset: number };
}

function parseEvent(block: string): { name: string; data: unknown } {
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
