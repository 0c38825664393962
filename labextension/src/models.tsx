/** The Models tab: models deployed on Triton that this user may call. */

import * as React from 'react';

import { getJSON, IModel, ITensor } from './api';
import { ErrorLine, usePolling } from './common';

const tensors = (list: ITensor[]) => list.map(t => `${t.name} ${t.datatype}[${t.shape.join(',')}]`).join(', ');

export function ModelsView(props: { visible: () => boolean }): JSX.Element {
  const [models, error] = usePolling(async () => (await getJSON<{ models: IModel[] }>('models')).models, props.visible);
  return (
    <div className="jp-gpulab-section">
      <ErrorLine error={error} />
      {models && models.length === 0 && <p className="jp-gpulab-empty">No models deployed. Deploy one with %deploy.</p>}
      {models && models.length > 0 && (
        <ul className="jp-gpulab-list jp-gpulab-models">
          {models.map(m => (
            <li
              key={m.name}
              className="jp-gpulab-card"
              data-model={m.name}
              title={`backend: ${m.backend ?? 'unknown'}; owner: ${m.owner ?? '-'}`}
            >
              <div className="jp-gpulab-card-head">
                <span className="jp-gpulab-name">{m.name}</span>
                <span className={`jp-gpulab-state jp-gpulab-state-${m.ready ? 'succeeded' : 'queued'}`}>
                  {m.ready ? 'ready' : 'not ready'}
                </span>
              </div>
              <div>
                {m.versions.map(v => (
                  <span key={v.version} className="jp-gpulab-version" title={v.source ?? ''}>
                    v{v.version} {v.state}
                  </span>
                ))}
              </div>
              <div className="jp-gpulab-reason jp-gpulab-signature">
                {tensors(m.inputs)} → {tensors(m.outputs)}
              </div>
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}
