/** The Attestation tab: each GPU node's last NVIDIA attestation, and whether it may run gated jobs. */

import * as React from 'react';

import { getJSON, INode } from './api';
import { ago, ErrorLine, usePolling } from './common';

export function AttestationView(props: { visible: () => boolean }): JSX.Element {
  const [list, error] = usePolling(() => getJSON<{ nodes: INode[]; max_age: number }>('attestation/nodes'), props.visible);
  return (
    <div className="jp-gpulab-section">
      <ErrorLine error={error} />
      {list && list.nodes.length === 0 && (
        <p className="jp-gpulab-empty">No GPU node has been attested. Run `gpulab attest collect` on a node.</p>
      )}
      {list && list.nodes.length > 0 && (
        <table className="jp-gpulab-table jp-gpulab-nodes">
          <thead>
            <tr>
              <th>Node</th>
              <th>Status</th>
              <th>GPUs</th>
              <th>Verified</th>
            </tr>
          </thead>
          <tbody>
            {list.nodes.map(n => (
              <tr key={n.node} data-node={n.node} title={n.last_reason}>
                <td className="jp-gpulab-name">{n.node}</td>
                <td>
                  <span className={`jp-gpulab-state jp-gpulab-state-${n.valid ? 'succeeded' : 'failed'}`}>
                    {n.valid ? 'attested' : n.revoked ? 'revoked' : 'not attested'}
                  </span>
                  {!n.valid && n.problem && <div className="jp-gpulab-reason">{n.problem}</div>}
                </td>
                <td>{Object.keys(n.devices).length}</td>
                <td title={n.expires_at ? `valid until ${n.expires_at}` : ''}>
                  {n.verified_at ? `${ago(n.verified_at)} by ${n.user}` : '-'}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </div>
  );
}
