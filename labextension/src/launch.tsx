/** The "New job" form of the Jobs tab: a command line run as a job in the file browser's folder. */

import { PageConfig } from '@jupyterlab/coreutils';
import * as React from 'react';

import { IJob, send } from './api';
import { ErrorLine, fieldError } from './common';

export interface ILaunchProps {
  /** The file browser's folder, relative to the server root. */
  cwd: () => string;
  /** Whether the user may request GPUs (custom:gpulab:gpu). */
  gpus: boolean;
  onLaunched: (job: IJob) => void;
}

/** Split a command line into argv: whitespace separates, single and double quotes group, backslash escapes. */
export function splitCommand(line: string): string[] {
  const args: string[] = [];
  let current: string | null = null;
  let quote: string | null = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote) {
      if (c === quote) {
        quote = null;
      } else if (c === '\\' && quote === '"' && i + 1 < line.length) {
        current += line[++i];
      } else {
        current += c;
      }
    } else if (c === '"' || c === "'") {
      quote = c;
      current = current ?? '';
    } else if (c === '\\' && i + 1 < line.length) {
      current = (current ?? '') + line[++i];
    } else if (/\s/.test(c)) {
      if (current !== null) {
        args.push(current);
        current = null;
      }
    } else {
      current = (current ?? '') + c;
    }
  }
  if (quote) {
    throw new Error(`unclosed ${quote} quote`);
  }
  if (current !== null) {
    args.push(current);
  }
  return args;
}

export function LaunchForm(props: ILaunchProps): JSX.Element {
  const [name, setName] = React.useState('');
  const [command, setCommand] = React.useState('');
  const [gpus, setGpus] = React.useState(0);
  const [experiment, setExperiment] = React.useState('');
  const [error, setError] = React.useState<{ message: string; field: string | null } | null>(null);
  const [busy, setBusy] = React.useState(false);

  const submit = async (event: React.FormEvent) => {
    event.preventDefault();
    let argv: string[];
    try {
      argv = splitCommand(command);
    } catch (e) {
      setError({ message: `command: ${(e as Error).message}`, field: 'entrypoint' });
      return;
    }
    const root = PageConfig.getOption('serverRoot').replace(/\/$/, '');
    const spec: Record<string, unknown> = {
      name,
      entrypoint: argv,
      working_dir: [root, props.cwd()].filter(Boolean).join('/'),
      resources: { gpus }
    };
    if (experiment) {
      spec.tracking = { experiment };
    }
    setBusy(true);
    try {
      const job = await send<IJob>('POST', 'jobs', spec);
      setError(null);
      setName('');
      setCommand('');
      props.onLaunched(job!);
    } catch (e) {
      setError(fieldError(e));
    } finally {
      setBusy(false);
    }
  };

  const invalid = (field: string) => (error?.field?.startsWith(field) ? ' jp-gpulab-invalid' : '');
  return (
    <form className="jp-gpulab-launch" onSubmit={submit} aria-label="New job">
      <label>
        Name
        <input className={invalid('name')} value={name} onChange={e => setName(e.target.value)} required />
      </label>
      <label>
        Command
        <input
          className={invalid('entrypoint')}
          value={command}
          placeholder="python train.py --epochs 5"
          onChange={e => setCommand(e.target.value)}
          required
        />
      </label>
      <label title={props.gpus ? '' : 'needs the custom:gpulab:gpu scope'}>
        GPUs
        <input
          className={invalid('resources.gpus')}
          type="number"
          min={0}
          value={gpus}
          onChange={e => setGpus(Number(e.target.value))}
        />
      </label>
      <label>
        MLflow experiment
        <input value={experiment} placeholder="the job's name" onChange={e => setExperiment(e.target.value)} />
      </label>
      <div className="jp-gpulab-reason">Runs in the file browser's folder: /{props.cwd()}</div>
      <ErrorLine error={error?.message ?? null} />
      <button className="jp-gpulab-button" type="submit" disabled={busy}>
        Submit
      </button>
    </form>
  );
}
