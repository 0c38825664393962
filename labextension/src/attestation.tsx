/** The Attestation tab: each GPU node's last NVIDIA attestation, and whether it may run gated jobs. */

import * as React from 'react';

import { getJSON, INode } from './api';
import { ago, ErrorLine, plural, usePolling } from './common';

export function AttestationView(props: { visible: () => boolean }): JSX.Element {
  const [list, error] = usePolling(
    () => getJSON<{ nodes: INode[]; max_age: number }>('attestation/nodes'),
    props.visible
  );
  return (
    <div className="jp-gpulab-section">
      <ErrorLine error={error} />
      {list && list.nodes.length === 0 && (
        <p className="jp-gpulab-empty">No GPU node has been attested. Run `gpulab attest collect` on a node.</p>
      )}
      {list && list.nodes.length > 0 && (
        <ul className="jp-gpulab-list jp-gpulab-nodes">
          {list.nodes.map(n => (
            <li key={n.node} className="jp-gpulab-card" data-node={n.node} title={n.last_reason}>
              <div className="jp-gpulab-card-head">
                <span className="jp-gpulab-name">{n.node}</span>
                <span className={`jp-gpulab-state jp-gpulab-state-${n.valid ? 'succeeded' : 'failed'}`}>
                  {n.valid ? 'attested' : n.revoked ? 'revoked' : 'not attested'}
                </span>
              </div>
              {!n.valid && n.problem && <div className="jp-gpulab-reason">{n.problem}</div>}
              <div className="jp-gpulab-reason" title={n.expires_at ? `valid until ${n.expires_at}` : ''}>
                {plural(Object.keys(n.devices).length, 'GPU')} ·{' '}
                {n.verified_at ? `verified ${ago(n.verified_at)} by ${n.user}` : 'never verified'}
              </div>
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}
