/** The Jobs tab: the user's training jobs, live, with logs, cancel and delete. */

import * as React from 'react';

import { getJSON, IJob, TERMINAL_STATES } from './api';
import { Act, ago, ErrorLine, plural, useAct, usePolling } from './common';
import { LaunchForm } from './launch';
import { NotificationForm } from './notifyprefs';
import type { IPanelActions } from './panel';

export interface IJobsProps {
  visible: () => boolean;
  actions: IPanelActions;
  mlflowUrl: string | null;
  canRequestGpus: boolean;
}

export function JobsView(props: IJobsProps): JSX.Element {
  const [state, setState] = React.useState('');
  const [launching, setLaunching] = React.useState(false);
  const [notifying, setNotifying] = React.useState(false);
  const query = state ? `jobs?limit=50&state=${state}` : 'jobs?limit=50';
  const [jobs, loadError, refresh] = usePolling(
    async () => (await getJSON<{ jobs: IJob[] }>(query)).jobs,
    props.visible,
    [query]
  );

  const [error, act] = useAct(refresh);

  return (
    <div className="jp-gpulab-section">
      <div className="jp-gpulab-toolbar">
        <label>
          State{' '}
          <select aria-label="Filter jobs by state" value={state} onChange={e => setState(e.target.value)}>
            <option value="">all</option>
            {['queued', 'running', ...TERMINAL_STATES].map(s => (
              <option key={s} value={s}>
                {s}
              </option>
            ))}
          </select>
        </label>
        <span>
          <button className="jp-gpulab-button" onClick={() => setLaunching(!launching)} aria-expanded={launching}>
            New job
          </button>
          <button
            className="jp-gpulab-button"
            onClick={() => setNotifying(!notifying)}
            aria-expanded={notifying}
            title="When you are told that a job ended, and where"
          >
            Notify…
          </button>
          <button className="jp-gpulab-button" onClick={refresh} title="Refresh now">
            Refresh
          </button>
        </span>
      </div>
      {notifying && <NotificationForm onSaved={() => setNotifying(false)} />}
      {launching && (
        <LaunchForm
          cwd={props.actions.cwd}
          gpus={props.canRequestGpus}
          onLaunched={() => {
            setLaunching(false);
            refresh();
          }}
        />
      )}
      <ErrorLine error={error ?? loadError} />
      {jobs && jobs.length === 0 && (
        <p className="jp-gpulab-empty">
          {state ? `No ${state} jobs.` : 'No jobs yet. Submit one with %%train or gpulab.submit().'}
        </p>
      )}
      {jobs && jobs.length > 0 && (
        <ul className="jp-gpulab-list jp-gpulab-jobs">
          {jobs.map(job => (
            <JobCard key={job.id} job={job} act={act} actions={props.actions} mlflowUrl={props.mlflowUrl} />
          ))}
        </ul>
      )}
    </div>
  );
}

function JobCard(props: { job: IJob; act: Act; actions: IPanelActions; mlflowUrl: string | null }): JSX.Element {
  const { job, act } = props;
  const finished = TERMINAL_STATES.includes(job.state);
  const { step, total, metrics } = job.progress;
  const metricText = Object.entries(metrics ?? {})
    .map(([k, v]) => `${k}=${typeof v === 'number' ? +v.toPrecision(4) : v}`)
    .join(' ');
  const gpus = job.resources.gpus ? plural(job.resources.gpus, 'GPU') : 'CPU';
  return (
    <li className="jp-gpulab-card" data-job-id={job.id} title={job.id}>
      <div className="jp-gpulab-card-head">
        <span className="jp-gpulab-name">
          {job.name}
          {job.array && (
            <span className="jp-gpulab-reason" title={`job array ${job.array.id}`}>
              {' '}
              [{job.array.index + 1}/{job.array.count}]
              {job.array.params
                ? ' ' +
                  Object.entries(job.array.params)
                    .map(([name, value]) => `${name}=${value}`)
                    .join(' ')
                : ''}
            </span>
          )}
        </span>
        <span className={`jp-gpulab-state jp-gpulab-state-${job.state}`} title={job.state_reason}>
          {job.state}
        </span>
      </div>
      {['queued', 'failed', 'timed_out'].includes(job.state) && job.state_reason && (
        <div className="jp-gpulab-reason">{job.state_reason}</div>
      )}
      {step !== null && (
        <div className="jp-gpulab-progress">
          {total ? <progress value={step} max={total} /> : null}
          <span>{total ? `${step}/${total}` : `step ${step}`}</span>{' '}
          <span className="jp-gpulab-reason">{metricText}</span>
        </div>
      )}
      <div className="jp-gpulab-card-foot">
        <span className="jp-gpulab-reason" title={job.created_at}>
          {gpus} · {ago(job.created_at)}
          {job.preemptions ? ` · preempted ${job.preemptions}×` : ''}
        </span>
        <span className="jp-gpulab-actions">
          {job.mlflow_run_id && props.mlflowUrl && (
            <a
              href={`${props.mlflowUrl.replace(/\/$/, '')}/#/runs/${job.mlflow_run_id}`}
              target="_blank"
              rel="noreferrer"
            >
              MLflow
            </a>
          )}
          {finished && job.output_notebook && (
            <button
              className="jp-gpulab-button"
              title={job.output_notebook}
              onClick={() => props.actions.openFile(job.output_notebook!)}
            >
              Output
            </button>
          )}
          <button className="jp-gpulab-button" onClick={() => props.actions.openLogs(job)}>
            Logs
          </button>
          {finished ? (
            <button className="jp-gpulab-button" onClick={() => act(`Delete ${job.name}`, 'DELETE', `jobs/${job.id}`)}>
              Delete
            </button>
          ) : (
            <>
              {job.state === 'queued' && (
                <button
                  className="jp-gpulab-button"
                  title={job.held ? 'Let it start when it can' : 'Keep it from starting until released'}
                  onClick={() =>
                    act(`${job.held ? 'Release' : 'Hold'} ${job.name}`, 'PATCH', `jobs/${job.id}`, { held: !job.held })
                  }
                >
                  {job.held ? 'Release' : 'Hold'}
                </button>
              )}
              <button
                className="jp-gpulab-button"
                onClick={() => act(`Cancel ${job.name}`, 'POST', `jobs/${job.id}/cancel`)}
              >
                Cancel
              </button>
            </>
          )}
        </span>
      </div>
    </li>
  );
}
