/** gpulab's JupyterLab extension: a side panel for jobs, models and attestation, and live job logs. */

import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { LabIcon } from '@jupyterlab/ui-components';

import { IJob } from './api';
import { jobLogWidget } from './logs';
import { GpulabPanel } from './panel';

import gpuSvg from '../style/gpu.svg';

export const gpulabIcon = new LabIcon({ name: 'gpulab:gpu', svgstr: gpuSvg });

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'gpulab-labextension:plugin',
  description: 'gpulab jobs, models and attestation status in JupyterLab.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette, ILayoutRestorer, IDefaultFileBrowser],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    browser: IDefaultFileBrowser | null
  ) => {
    const openLogs = (job: IJob) => {
      const id = `gpulab-log-${job.id}`;
      const open = Array.from(shell.widgets('main')).find(w => w.id === id);
      if (open) {
        shell.activateById(id);
        return;
      }
      shell.add(jobLogWidget(job), 'main');
    };
    const panel = new GpulabPanel(openLogs, () => browser?.model.path ?? '');
    panel.title.icon = gpulabIcon;
    panel.title.caption = 'gpulab: jobs, models, attestation';
    shell.add(panel, 'left', { rank: 600 });
    restorer?.add(panel, 'gpulab-panel');

    app.commands.addCommand('gpulab:open', {
      label: 'gpulab: Show jobs, models and attestation',
      icon: gpulabIcon,
      execute: () => shell.activateById(panel.id)
    });
    palette?.addItem({ command: 'gpulab:open', category: 'gpulab' });
  }
};

export default plugin;
