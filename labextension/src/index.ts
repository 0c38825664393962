/** gpulab's JupyterLab extension: a side panel for jobs, models and attestation, and live job logs. */

import { ILabShell, ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, Notification, ToolbarButton } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';

import { getJSON, IJob, IPipeline, IWhoAmI, send } from './api';
import { fieldError } from './common';
import { jobLogWidget } from './logs';
import { watchFeed } from './notify';
import { GpulabPanel } from './panel';
import { runNotebookAsJob } from './runjob';

import gpuSvg from '../style/gpu.svg';

export const gpulabIcon = new LabIcon({ name: 'gpulab:gpu', svgstr: gpuSvg });

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'gpulab-labextension:plugin',
  description: 'gpulab jobs, models and attestation status in JupyterLab.',
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette, ILayoutRestorer, IDefaultFileBrowser, INotebookTracker],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    browser: IDefaultFileBrowser | null,
    notebooks: INotebookTracker | null
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
    const root = PageConfig.getOption('serverRoot').replace(/\/$/, '');
    /** Open a file by its absolute path; Lab opens only what is below the server's root. */
    const openFile = (path: string) => {
      if (path.startsWith(`${root}/`)) {
        void app.commands.execute('docmanager:open', { path: path.slice(root.length + 1) });
      } else {
        Notification.warning(`${path} is outside this server's folder (${root}), so Lab cannot open it`);
      }
    };
    const panel = new GpulabPanel({ openLogs, openFile, cwd: () => browser?.model.path ?? '' });
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
    const showJobs = () => shell.activateById(panel.id);

    let scopes: string[] = [];
    void getJSON<IWhoAmI>('whoami')
      .then(who => {
        scopes = who.scopes;
        if (scopes.includes('custom:gpulab:jobs')) {
          watchFeed({ showJobs, openFile });
        }
      })
      .catch(() => undefined); // the panel shows why the API cannot be reached

    // Run as job…: the current notebook (saved first) from its toolbar, or a notebook chosen in the file browser.
    const chosenNotebook = (): string | null => {
      const item = browser?.selectedItems().next();
      return item && !item.done && item.value.type === 'notebook' ? item.value.path : null;
    };
    const run = (path: string) =>
      runNotebookAsJob(path, {
        kernelspecs: app.serviceManager.kernelspecs,
        canRequestGpus: () => scopes.includes('custom:gpulab:gpu'),
        showJobs
      });
    const runOpen = async (notebook: NotebookPanel) => {
      if (notebook.context.model.dirty) {
        await notebook.context.save();
      }
      await run(notebook.context.path);
    };
    app.commands.addCommand('gpulab:run-notebook-as-job', {
      label: 'Run as job…',
      caption: 'Run this notebook as a gpulab job, with its parameters changed',
      icon: gpulabIcon,
      isEnabled: () => !!notebooks?.currentWidget || !!chosenNotebook(),
      execute: async args => {
        const chosen = args.fromBrowser ? chosenNotebook() : null;
        if (chosen) {
          await run(chosen);
        } else if (notebooks?.currentWidget) {
          await runOpen(notebooks.currentWidget);
        }
      }
    });
    palette?.addItem({ command: 'gpulab:run-notebook-as-job', category: 'gpulab' });
    app.contextMenu.addItem({
      command: 'gpulab:run-notebook-as-job',
      args: { fromBrowser: true },
      selector: '.jp-DirListing-item[data-file-type="notebook"]',
      rank: 11
    });
    // Run pipeline: a pipeline file chosen in the file browser, as gpulab pipeline submit runs it.
    app.commands.addCommand('gpulab:run-pipeline', {
      label: 'Run pipeline',
      caption: 'Submit this pipeline file: each step a gpulab job that needs others',
      icon: gpulabIcon,
      execute: async () => {
        const item = browser?.selectedItems().next();
        if (!item || item.done) {
          return;
        }
        try {
          const run = await send<IPipeline>('POST', 'pipelines', { path: item.value.path });
          Notification.info(`Pipeline ${run!.name} submitted: ${run!.steps.map(s => s.name).join(', ')}`, {
            autoClose: 5000,
            actions: [{ label: 'Open the gpulab panel', callback: showJobs }]
          });
        } catch (e) {
          Notification.error(`Run pipeline: ${fieldError(e).message}`, { autoClose: false });
        }
      }
    });
    app.contextMenu.addItem({
      command: 'gpulab:run-pipeline',
      selector: '.jp-DirListing-item[data-file-type="yaml"]',
      rank: 11
    });
    app.docRegistry.addWidgetExtension('Notebook', {
      createNew: (widget: NotebookPanel) => {
        const button = new ToolbarButton({
          icon: gpulabIcon,
          label: 'Run as job…',
          tooltip: 'Run this notebook as a gpulab job (saved first), with its parameters changed',
          onClick: () => void runOpen(widget)
        });
        button.addClass('jp-gpulab-run-as-job');
        widget.toolbar.insertAfter('cellType', 'gpulab-run-as-job', button);
        return button;
      }
    });
  }
};

export default plugin;
