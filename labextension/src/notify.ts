/**
 * JupyterLab notifications when a job or pipeline of the user ends in a state they are told of: the job service
 * keeps a feed per user (`GET notifications/feed?after=N`), which every open Lab reads every few seconds from its
 * cursor, kept in this browser so that what ended while Lab was closed is told when it opens again.
 */

import { Notification } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { Poll } from '@lumino/polling';

import { getJSON, IEndedJob, IEndedPipeline, INotificationFeed } from './api';

export const FEED_MS = 5000;

/** What a notification's buttons do: given by the plugin. */
export interface IJobActions {
  showJobs: () => void;
  /** Open a file by its absolute path (or say why it cannot be). */
  openFile: (path: string) => void;
}

/** The notification of one ended job. */
export function tell(job: IEndedJob, actions: IJobActions): void {
  const type = job.state === 'succeeded' ? 'success' : job.state === 'cancelled' ? 'warning' : 'error';
  const buttons: Notification.IAction[] = [{ label: 'Show jobs', callback: actions.showJobs }];
  if (job.output_notebook) {
    const output = job.output_notebook;
    buttons.unshift({ label: 'Open output', callback: () => actions.openFile(output), displayType: 'accent' });
  }
  const reason = job.state === 'succeeded' ? '' : `: ${job.state_reason}`;
  Notification.emit(`Job ${job.name} ${job.state}${reason}`, type, { autoClose: false, actions: buttons });
}

/** The notification of one ended pipeline: its state, and the steps that did not succeed. */
export function tellPipeline(pipeline: IEndedPipeline, actions: IJobActions): void {
  const type = pipeline.state === 'succeeded' ? 'success' : pipeline.state === 'cancelled' ? 'warning' : 'error';
  const unsuccessful = pipeline.steps
    .filter(s => s.state !== 'succeeded')
    .map(s => `${s.name} ${s.state ?? 'deleted'}`);
  const detail = pipeline.state === 'succeeded' || unsuccessful.length === 0 ? '' : `: ${unsuccessful.join(', ')}`;
  Notification.emit(`Pipeline ${pipeline.name} ${pipeline.state}${detail}`, type, {
    autoClose: false,
    actions: [{ label: 'Open the gpulab panel', callback: actions.showJobs }]
  });
}

/** Read the feed every {@link FEED_MS} (less often while the tab is hidden, with backoff on errors). */
export function watchFeed(actions: IJobActions): Poll {
  const key = `gpulab:notifications:${PageConfig.getOption('hubUser') || 'local'}`;
  const stored = window.localStorage.getItem(key);
  let cursor: number | null = stored !== null && /^\d+$/.test(stored) ? Number(stored) : null;
  const poll = new Poll({
    factory: async () => {
      const feed = await getJSON<INotificationFeed>(
        cursor === null ? 'notifications/feed' : `notifications/feed?after=${cursor}`
      );
      for (const entry of feed.notifications) {
        if (entry.pipeline) {
          tellPipeline(entry.pipeline, actions);
        } else if (entry.job) {
          tell(entry.job, actions);
        }
      }
      cursor = feed.cursor;
      const seen = Number(window.localStorage.getItem(key) ?? 0);
      window.localStorage.setItem(key, String(Math.max(seen, cursor)));
    },
    frequency: { interval: FEED_MS, backoff: true, max: 60_000 },
    standby: 'when-hidden',
    name: 'gpulab:notifications'
  });
  return poll;
}
