/** The Schedules tab: the user's schedules (kept and run by the job service), with pause, resume, run now, delete. */

import * as React from 'react';

import { getJSON, ISchedule } from './api';
import { ErrorLine, useAct, usePolling } from './common';

/** "in 5m", "in 3h", or the date, of a time in the future. */
export function until(iso: string | null): string {
  if (!iso) {
    return '-';
  }
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  if (seconds < 60) {
    return 'in under a minute';
  }
  if (seconds < 3600) {
    return `in ${Math.round(seconds / 60)}m`;
  }
  if (seconds < 86400) {
    return `in ${Math.round(seconds / 3600)}h`;
  }
  return new Date(iso).toLocaleString();
}

export function SchedulesView(props: { visible: () => boolean }): JSX.Element {
  const [schedules, loadError, refresh] = usePolling(
    async () => (await getJSON<{ schedules: ISchedule[] }>('schedules')).schedules,
    props.visible
  );
  const [error, act] = useAct(refresh);
  return (
    <div className="jp-gpulab-section">
      <ErrorLine error={error ?? loadError} />
      {schedules && schedules.length === 0 && (
        <p className="jp-gpulab-empty">No schedules. Make one with "Run as job…" on a notebook, or %schedule.</p>
      )}
      {schedules && schedules.length > 0 && (
        <ul className="jp-gpulab-list jp-gpulab-schedules">
          {schedules.map(s => (
            <li key={s.id} className="jp-gpulab-card" data-schedule-id={s.id} title={s.id}>
              <div className="jp-gpulab-card-head">
                <span className="jp-gpulab-name">{s.name}</span>
                <span className={`jp-gpulab-state jp-gpulab-state-${s.state === 'active' ? 'running' : 'queued'}`}>
                  {s.state}
                </span>
              </div>
              <div className="jp-gpulab-reason">
                <code>{s.cron}</code> {s.timezone} · next {s.state === 'active' ? until(s.next_run_at) : '-'} · {s.runs}{' '}
                runs{s.skipped ? `, ${s.skipped} skipped` : ''}
              </div>
              {s.last_error && <div className="jp-gpulab-reason">{s.last_error}</div>}
              <div className="jp-gpulab-card-foot">
                <span />
                <span className="jp-gpulab-actions">
                  <button
                    className="jp-gpulab-button"
                    onClick={() =>
                      act(`${s.state === 'active' ? 'Pause' : 'Resume'} ${s.name}`, 'PATCH', `schedules/${s.id}`, {
                        paused: s.state === 'active'
                      })
                    }
                  >
                    {s.state === 'active' ? 'Pause' : 'Resume'}
                  </button>
                  <button
                    className="jp-gpulab-button"
                    onClick={() => act(`Run ${s.name}`, 'POST', `schedules/${s.id}/run`)}
                  >
                    Run now
                  </button>
                  <button
                    className="jp-gpulab-button"
                    onClick={() => act(`Delete ${s.name}`, 'DELETE', `schedules/${s.id}`)}
                  >
                    Delete
                  </button>
                </span>
              </div>
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}
