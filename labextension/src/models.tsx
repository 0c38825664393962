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
        <table className="jp-gpulab-table jp-gpulab-models">
          <thead>
            <tr>
              <th>Model</th>
              <th>Ready</th>
              <th>Versions</th>
              <th>Inputs → outputs</th>
            </tr>
          </thead>
          <tbody>
            {models.map(m => (
              <tr key={m.name} data-model={m.name} title={`backend: ${m.backend ?? 'unknown'}; owner: ${m.owner ?? '-'}`}>
                <td className="jp-gpulab-name">{m.name}</td>
                <td>
                  <span className={`jp-gpulab-state jp-gpulab-state-${m.ready ? 'succeeded' : 'queued'}`}>
                    {m.ready ? 'ready' : 'not ready'}
                  </span>
                </td>
                <td>
                  {m.versions.map(v => (
                    <div key={v.version} title={v.source ?? ''}>
                      v{v.version} {v.state}
                    </div>
                  ))}
                </td>
                <td>
                  {tensors(m.inputs)} → {tensors(m.outputs)}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </div>
  );
}
