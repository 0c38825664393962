/** A main-area tab that follows one job's log live (server-sent events) until the job ends. */

import { MainAreaWidget } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { APIError, followLogs, IJob } from './api';

class JobLog extends Widget {
  private readonly abort = new AbortController();
  private readonly text = document.createElement('pre');
  readonly status = document.createElement('div');

  constructor(readonly job: IJob) {
    super();
    this.addClass('jp-gpulab-Log');
    this.status.className = 'jp-gpulab-log-status';
    this.node.append(this.status, this.text);
    this.follow();
  }

  dispose(): void {
    this.abort.abort();
    super.dispose();
  }

  private async follow(): Promise<void> {
    this.status.textContent = `following ${this.job.name} (${this.job.id})…`;
    try {
      const state = await followLogs(this.job.id, 0, text => this.append(text), this.abort.signal);
      if (state) {
        this.status.textContent = `${this.job.name}: ${state}`;
      }
    } catch (e) {
      this.status.textContent = `log unavailable: ${e instanceof APIError ? e.message : e}`;
    }
  }

  private append(text: string): void {
    const atBottom = this.node.scrollTop + this.node.clientHeight >= this.node.scrollHeight - 4;
    this.text.append(text);
    if (atBottom) {
      this.node.scrollTop = this.node.scrollHeight;
    }
  }
}

export function jobLogWidget(job: IJob): MainAreaWidget<JobLog> {
  const widget = new MainAreaWidget({ content: new JobLog(job) });
  widget.id = `gpulab-log-${job.id}`;
  widget.title.label = `Log: ${job.name}`;
  widget.title.closable = true;
  return widget;
}
