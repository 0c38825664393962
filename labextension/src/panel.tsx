/** The gpulab side panel: who and where (GPUs, services), then its tabs (jobs, schedules, pipelines, quota, models,
 * attestation). */

import { ReactWidget } from '@jupyterlab/ui-components';
import * as React from 'react';

import { getJSON, IJob, IStatus, IWhoAmI } from './api';
import { AttestationView } from './attestation';
import { ErrorLine, usePolling } from './common';
import { JobsView } from './jobs';
import { ModelsView } from './models';
import { PipelinesView } from './pipelines';
import { QuotaView } from './quota';
import { SchedulesView } from './schedules';

const TABS = [
  { id: 'jobs', label: 'Jobs', scope: 'custom:gpulab:jobs' },
  { id: 'schedules', label: 'Schedules', scope: 'custom:gpulab:jobs' },
  { id: 'pipelines', label: 'Pipelines', scope: 'custom:gpulab:jobs' },
  { id: 'quota', label: 'Quota', scope: 'custom:gpulab:jobs' },
  { id: 'models', label: 'Models', scope: 'custom:gpulab:infer' },
  { id: 'attestation', label: 'Attestation', scope: 'custom:gpulab:attest' }
];

/** What the panel asks of the rest of Lab: given by the plugin. */
export interface IPanelActions {
  openLogs: (job: IJob) => void;
  /** Open a file by its absolute path (or say why it cannot be). */
  openFile: (path: string) => void;
  /** The file browser's folder (relative to the server root), where new jobs run. */
  cwd: () => string;
}

export class GpulabPanel extends ReactWidget {
  constructor(private readonly actions: IPanelActions) {
    super();
    this.id = 'gpulab-panel';
    this.addClass('jp-gpulab-Panel');
  }

  render(): JSX.Element {
    return <Panel visible={() => this.isVisible} actions={this.actions} />;
  }
}

function Panel(props: { visible: () => boolean; actions: IPanelActions }): JSX.Element {
  const [chosen, setTab] = React.useState('jobs');
  const [who, whoError] = usePolling(
    () => getJSON<IWhoAmI>('whoami'),
    () => false
  );
  const [status] = usePolling(() => getJSON<IStatus>('status'), props.visible);
  const tabs = who ? TABS.filter(t => who.scopes.includes(t.scope)) : [];
  const tab = tabs.some(t => t.id === chosen) ? chosen : tabs[0]?.id;
  const gpus = status ? (status.gpus === 'none' ? 'no GPU' : status.gpus.map(g => g.name).join(', ')) : '';
  const open = status?.breakers.filter(b => b.state !== 'closed') ?? [];
  return (
    <div className="jp-gpulab-body">
      <header className="jp-gpulab-header">
        <h2>gpulab</h2>
        {who && (
          <div className="jp-gpulab-who">
            {who.name}
            {who.admin ? ' (admin)' : ''} · {gpus}
          </div>
        )}
        {open.map(b => (
          <div key={b.name} className="jp-gpulab-error" role="alert">
            {b.name} unavailable ({b.state}){b.last_error ? `: ${b.last_error}` : ''}
          </div>
        ))}
      </header>
      <ErrorLine error={whoError} />
      {who && tabs.length === 0 && <p className="jp-gpulab-empty">Your account has no gpulab scopes.</p>}
      <nav className="jp-gpulab-tabs" role="tablist">
        {tabs.map(t => (
          <button
            key={t.id}
            role="tab"
            aria-selected={tab === t.id}
            className={`jp-gpulab-tab${tab === t.id ? ' jp-mod-current' : ''}`}
            onClick={() => setTab(t.id)}
          >
            {t.label}
          </button>
        ))}
      </nav>
      {tab === 'jobs' && (
        <JobsView
          visible={props.visible}
          actions={props.actions}
          mlflowUrl={status?.services.mlflow_ui ?? null}
          canRequestGpus={!!who?.scopes.includes('custom:gpulab:gpu')}
        />
      )}
      {tab === 'schedules' && <SchedulesView visible={props.visible} />}
      {tab === 'pipelines' && <PipelinesView visible={props.visible} />}
      {tab === 'quota' && <QuotaView visible={props.visible} />}
      {tab === 'models' && <ModelsView visible={props.visible} />}
      {tab === 'attestation' && <AttestationView visible={props.visible} />}
    </div>
  );
}
