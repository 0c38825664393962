/**
 * "Run as job…": a notebook run by papermill as a job, with its parameters (read from the cell tagged
 * `parameters` by the server), kernel, GPUs and output formats chosen in a dialog.
 */

import { Dialog, Notification, showDialog } from '@jupyterlab/apputils';
import { KernelSpec } from '@jupyterlab/services';
import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { getJSON, IJob, INotebookParameter, INotebookParameters, ISchedule, send } from './api';
import { fieldError } from './common';
import { until } from './schedules';

/** What the dialog asks for; `values` are the parameters as typed (text), sent only where changed. */
export interface IRunChoices {
  name: string;
  kernel: string;
  gpus: number;
  html: boolean;
  values: Record<string, string>;
  /** What of the notebook's folder is copied with it: nothing, all of it, or the comma-separated `files`. */
  include: 'none' | 'folder' | 'list';
  files: string;
  /** Now, or at the times of `cron` in `timezone` (a schedule, kept by the job service). */
  when: 'now' | 'schedule';
  cron: string;
  timezone: string;
}

/** A parameter's text as the dialog shows it: the JSON value of a literal default, else its Python source. */
export function shownValue(p: INotebookParameter): string {
  if (!p.literal) {
    return '';
  }
  return typeof p.value === 'string' ? p.value : JSON.stringify(p.value);
}

/**
 * The JSON value of a parameter typed as `text`, by its type in the notebook: numbers and booleans (true,
 * false, True, False) where the default is one, JSON lists where it is a list, else the text as it is.
 */
export function parseValue(p: INotebookParameter, text: string): unknown {
  const type = p.type;
  if (type === 'int' || type === 'float') {
    const n = Number(text);
    if (text.trim() === '' || Number.isNaN(n) || (type === 'int' && !Number.isInteger(n))) {
      throw new Error(`${p.name}: ${JSON.stringify(text)} is not ${type === 'int' ? 'an integer' : 'a number'}`);
    }
    return n;
  }
  if (type === 'bool') {
    const t = text.trim().toLowerCase();
    if (t !== 'true' && t !== 'false') {
      throw new Error(`${p.name}: ${JSON.stringify(text)} is not true or false`);
    }
    return t === 'true';
  }
  if (type === 'list' || type === 'NoneType') {
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }
  return text;
}

/** The `files` of a submission: none, `["."]` for the whole folder, or the list typed (comma-separated). */
export function filesToInclude(choices: Pick<IRunChoices, 'include' | 'files'>): string[] {
  if (choices.include === 'folder') {
    return ['.'];
  }
  if (choices.include === 'list') {
    return choices.files
      .split(',')
      .map(f => f.trim())
      .filter(Boolean);
  }
  return [];
}

/** The parameters to inject: those whose text differs from what the dialog showed. */
export function changedParameters(
  params: INotebookParameter[],
  values: Record<string, string>
): Record<string, unknown> {
  const changed: Record<string, unknown> = {};
  for (const p of params) {
    const text = values[p.name];
    if (text !== undefined && text !== shownValue(p)) {
      changed[p.name] = parseValue(p, text);
    }
  }
  return changed;
}

class RunJobBody extends ReactWidget implements Dialog.IBodyWidget<IRunChoices> {
  private choices: IRunChoices;

  constructor(
    private readonly info: INotebookParameters,
    private readonly kernels: { name: string; label: string }[],
    initial: IRunChoices,
    private readonly canRequestGpus: boolean,
    private readonly error: string | null
  ) {
    super();
    this.addClass('jp-gpulab-RunJob');
    this.choices = { ...initial, values: { ...initial.values } };
  }

  getValue(): IRunChoices {
    return this.choices;
  }

  render(): JSX.Element {
    return (
      <RunJobForm
        info={this.info}
        kernels={this.kernels}
        initial={this.choices}
        gpus={this.canRequestGpus}
        error={this.error}
        onChange={c => (this.choices = c)}
      />
    );
  }
}

function RunJobForm(props: {
  info: INotebookParameters;
  kernels: { name: string; label: string }[];
  initial: IRunChoices;
  gpus: boolean;
  error: string | null;
  onChange: (choices: IRunChoices) => void;
}): JSX.Element {
  const [choices, setChoices] = React.useState(props.initial);
  const update = (change: Partial<IRunChoices>) => {
    const next = { ...choices, ...change };
    setChoices(next);
    props.onChange(next);
  };
  const setValue = (name: string, text: string) => update({ values: { ...choices.values, [name]: text } });
  return (
    <form className="jp-gpulab-launch" aria-label="Run as job" onSubmit={e => e.preventDefault()}>
      <div className="jp-gpulab-reason">{props.info.path}</div>
      <label>
        Name
        <input className="jp-mod-styled" value={choices.name} onChange={e => update({ name: e.target.value })} />
      </label>
      <label>
        Kernel
        <select
          className="jp-mod-styled"
          aria-label="Kernel"
          value={choices.kernel}
          onChange={e => update({ kernel: e.target.value })}
        >
          {props.kernels.map(k => (
            <option key={k.name} value={k.name}>
              {k.label}
            </option>
          ))}
        </select>
      </label>
      <label title={props.gpus ? '' : 'needs the custom:gpulab:gpu scope'}>
        GPUs
        <input
          className="jp-mod-styled"
          type="number"
          min={0}
          value={choices.gpus}
          onChange={e => update({ gpus: Number(e.target.value) })}
        />
      </label>
      <label>
        When
        <select
          className="jp-mod-styled"
          aria-label="When"
          value={choices.when}
          onChange={e => update({ when: e.target.value as IRunChoices['when'] })}
        >
          <option value="now">Now</option>
          <option value="schedule">On a schedule</option>
        </select>
      </label>
      {choices.when === 'schedule' && (
        <>
          <label title="Five fields (minute hour day month weekday), or @hourly, @daily, @weekly, @monthly">
            Cron
            <input
              className="jp-mod-styled"
              aria-label="Cron"
              value={choices.cron}
              placeholder="0 3 * * *"
              onChange={e => update({ cron: e.target.value })}
            />
          </label>
          <label>
            Time zone
            <input
              className="jp-mod-styled"
              aria-label="Time zone"
              value={choices.timezone}
              onChange={e => update({ timezone: e.target.value })}
            />
          </label>
        </>
      )}
      <label title="Copied with the notebook when it is submitted; the job runs in the copy (up to 100 MiB)">
        Files to include
        <select
          className="jp-mod-styled"
          aria-label="Files to include"
          value={choices.include}
          onChange={e => update({ include: e.target.value as IRunChoices['include'] })}
        >
          <option value="none">None: run in the notebook's folder</option>
          <option value="folder">The notebook's whole folder</option>
          <option value="list">These files and folders</option>
        </select>
      </label>
      {choices.include === 'list' && (
        <input
          className="jp-mod-styled"
          aria-label="Files"
          value={choices.files}
          placeholder="data/train.csv, utils.py (relative to the notebook's folder)"
          onChange={e => update({ files: e.target.value })}
        />
      )}
      <label className="jp-gpulab-check">
        <input type="checkbox" checked={choices.html} onChange={e => update({ html: e.target.checked })} /> HTML copy of
        the output notebook
      </label>
      <fieldset className="jp-gpulab-parameters">
        <legend>Parameters</legend>
        {props.info.parameters.length === 0 && (
          <div className="jp-gpulab-reason">No cell of this notebook is tagged parameters: it runs as it is.</div>
        )}
        {props.info.parameters.map(p => (
          <label key={p.name} title={p.help || p.default}>
            {p.name}
            {p.type ? <span className="jp-gpulab-reason"> ({p.type})</span> : null}
            <input
              className="jp-mod-styled"
              aria-label={`Parameter ${p.name}`}
              value={choices.values[p.name] ?? ''}
              placeholder={p.literal ? '' : `${p.default} (kept unless given)`}
              onChange={e => setValue(p.name, e.target.value)}
            />
          </label>
        ))}
      </fieldset>
      {props.error && (
        <div className="jp-gpulab-error" role="alert">
          {props.error}
        </div>
      )}
    </form>
  );
}

/** Where a job's log and output open, and the panel shows: given by the plugin. */
export interface IRunJobContext {
  kernelspecs: KernelSpec.IManager;
  canRequestGpus: () => boolean;
  showJobs: () => void;
}

/**
 * Ask how to run the notebook at `path` (relative to the server root), then submit it or make a schedule of it;
 * the job submitted, or null (a schedule, or the user cancelled). A refusal (the field and why) reopens the dialog with the choices kept.
 */
export async function runNotebookAsJob(path: string, context: IRunJobContext): Promise<IJob | null> {
  let info: INotebookParameters;
  try {
    info = await getJSON<INotebookParameters>(`notebooks/parameters?path=${encodeURIComponent(path)}`);
  } catch (e) {
    Notification.error(`Run as job: ${fieldError(e).message}`);
    return null;
  }
  await context.kernelspecs.ready;
  const specs = context.kernelspecs.specs?.kernelspecs ?? {};
  const kernels = Object.values(specs)
    .filter(s => !!s)
    .map(s => ({ name: s!.name, label: s!.display_name }));
  const notebookKernel = info.kernel && specs[info.kernel] ? info.kernel : (context.kernelspecs.specs?.default ?? '');
  let choices: IRunChoices = {
    name: path
      .split('/')
      .pop()!
      .replace(/\.ipynb$/, ''),
    kernel: notebookKernel,
    gpus: 0,
    html: false,
    values: Object.fromEntries(info.parameters.map(p => [p.name, shownValue(p)])),
    include: 'none',
    files: '',
    when: 'now',
    cron: '',
    timezone: Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC'
  };
  let error: string | null = null;
  for (;;) {
    const result = await showDialog({
      title: 'Run as job',
      body: new RunJobBody(info, kernels, choices, context.canRequestGpus(), error),
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Run' })],
      focusNodeSelector: 'input'
    });
    if (!result.button.accept || !result.value) {
      return null;
    }
    choices = result.value;
    try {
      const body = {
        path,
        name: choices.name || null,
        kernel: choices.kernel || null,
        gpus: choices.gpus,
        html: choices.html,
        parameters: changedParameters(info.parameters, choices.values),
        files: filesToInclude(choices)
      };
      if (choices.when === 'schedule') {
        const schedule = await send<ISchedule>('POST', 'notebooks/schedules', {
          ...body,
          cron: choices.cron,
          timezone: choices.timezone
        });
        Notification.info(`Schedule ${schedule!.name} made: next run ${until(schedule!.next_run_at)}`, {
          autoClose: 5000,
          actions: [{ label: 'Open the gpulab panel', callback: context.showJobs }]
        });
        return null;
      }
      const job = await send<IJob>('POST', 'notebooks/jobs', body);
      Notification.info(`Job ${job!.name} submitted`, {
        autoClose: 5000,
        actions: [{ label: 'Show jobs', callback: context.showJobs }]
      });
      return job;
    } catch (e) {
      error = fieldError(e).message;
    }
  }
}
