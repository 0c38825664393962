/** The Quota tab: the user's limits and use, and each cohort of their groups (every cohort, for admins) with what
 * each group may use (nominal), uses, borrows from the others and lends to them, and its fair-share usage. */

import * as React from 'react';

import { getJSON, IQuota } from './api';
import { ErrorLine, usePolling } from './common';

const amount = (value: number | null, resource: string): string => {
  if (value === null) {
    return 'none';
  }
  const shown = resource === 'memory' ? value / 2 ** 30 : value;
  return `${Number(shown.toFixed(2))}${resource === 'memory' ? 'Gi' : ''}`;
};

const hours = (seconds: number): string => String(Number((seconds / 3600).toFixed(2)));

export function QuotaView(props: { visible: () => boolean }): JSX.Element {
  const [quota, error] = usePolling(() => getJSON<IQuota>('quota'), props.visible);
  const limit = (value: number | null) => (value === null ? '' : ` of at most ${value}`);
  const cohorts = Object.entries(quota?.cohorts ?? {});
  return (
    <div className="jp-gpulab-section">
      <ErrorLine error={error} />
      {quota && (
        <p className="jp-gpulab-quota-mine">
          You run {quota.usage.jobs}
          {limit(quota.limits.max_jobs)} jobs on {quota.usage.gpus}
          {limit(quota.limits.max_gpus)} GPUs
          {quota.cohort_group ? `; your jobs use group ${quota.cohort_group}'s quota` : ''}.
          <span className="jp-gpulab-reason" title="weighted resource-hours, halved every JobQueue.usage_half_life">
            {' '}
            Fair-share usage: {hours(quota.decayed_usage ?? 0)} h.
          </span>
        </p>
      )}
      {quota && cohorts.length === 0 && (
        <p className="jp-gpulab-empty">No cohorts to show: none of your groups is in one.</p>
      )}
      {quota &&
        cohorts.map(([cohort, status]) => (
          <div key={cohort} className="jp-gpulab-scroll">
            <table className="jp-gpulab-table jp-gpulab-cohort" data-cohort={cohort}>
              <caption>Cohort {cohort}</caption>
              <thead>
                <tr>
                  <th scope="col">Group</th>
                  <th scope="col" title="nominal quota">
                    Quota
                  </th>
                  <th scope="col">Used</th>
                  <th scope="col" title="used beyond its quota, of others' quota">
                    Borrowed
                  </th>
                  <th scope="col" title="of its quota, used by other groups">
                    Lent
                  </th>
                </tr>
              </thead>
              <tbody>
                {Object.entries(status.groups).flatMap(([group, pools]) =>
                  Object.entries(pools).flatMap(([pool, resources]) =>
                    Object.entries(resources).map(([resource, n]) => (
                      <tr
                        key={`${group}/${pool}/${resource}`}
                        data-group={group}
                        className={group === quota.cohort_group ? 'jp-mod-current' : ''}
                        title={`borrowing limit ${amount(n.borrowing_limit, resource)}, lending limit ${amount(
                          n.lending_limit,
                          resource
                        )}`}
                      >
                        <td>
                          {group}
                          <div className="jp-gpulab-reason">
                            {resource} in {pool}
                          </div>
                        </td>
                        <td>{amount(n.nominal, resource)}</td>
                        <td>{amount(n.used, resource)}</td>
                        <td>{amount(n.borrowed, resource)}</td>
                        <td>{amount(n.lent, resource)}</td>
                      </tr>
                    ))
                  )
                )}
              </tbody>
            </table>
            <p className="jp-gpulab-reason jp-gpulab-fair-share" title="less usage per weight goes first">
              Fair-share usage (h):{' '}
              {Object.entries(status.decayed_usage ?? {})
                .map(([group, used]) => {
                  const weight = status.weights?.[group] ?? 1;
                  return `${group} ${hours(used)}${weight === 1 ? '' : ` (weight ${weight})`}`;
                })
                .join(', ')}
            </p>
          </div>
        ))}
    </div>
  );
}
