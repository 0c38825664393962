/** "Notify…" in the Jobs tab: which final states of your jobs you are told of, and where (PUT /notifications). */

import * as React from 'react';

import { getJSON, INotificationSettings, JobState, send, TERMINAL_STATES } from './api';
import { ErrorLine, fieldError } from './common';

export function NotificationForm(props: { onSaved: () => void }): JSX.Element {
  const [settings, setSettings] = React.useState<INotificationSettings | null>(null);
  const [error, setError] = React.useState<{ message: string; field: string | null } | null>(null);
  React.useEffect(() => {
    getJSON<INotificationSettings>('notifications')
      .then(setSettings)
      .catch(e => setError(fieldError(e)));
  }, []);
  if (!settings) {
    return <ErrorLine error={error?.message ?? null} />;
  }
  const toggle = (state: JobState) =>
    setSettings({
      ...settings,
      states: settings.states.includes(state) ? settings.states.filter(s => s !== state) : [...settings.states, state]
    });
  const save = async (event: React.FormEvent) => {
    event.preventDefault();
    try {
      await send('PUT', 'notifications', {
        states: settings.states,
        lab: settings.lab,
        webhook_url: settings.webhook_url || null,
        email: settings.email || null
      });
      setError(null);
      props.onSaved();
    } catch (e) {
      setError(fieldError(e));
    }
  };
  const invalid = (field: string) => (error?.field?.startsWith(field) ? ' jp-gpulab-invalid' : '');
  return (
    <form className="jp-gpulab-launch" onSubmit={save} aria-label="Notifications">
      <fieldset className="jp-gpulab-parameters">
        <legend>Tell me when a job of mine ends</legend>
        {TERMINAL_STATES.map(state => (
          <label key={state} className="jp-gpulab-check">
            <input type="checkbox" checked={settings.states.includes(state)} onChange={() => toggle(state)} /> {state}
          </label>
        ))}
      </fieldset>
      <label className="jp-gpulab-check">
        <input
          type="checkbox"
          checked={settings.lab}
          onChange={e => setSettings({ ...settings, lab: e.target.checked })}
        />{' '}
        in JupyterLab
      </label>
      <label>
        Webhook URL
        <input
          className={`jp-mod-styled${invalid('webhook_url')}`}
          value={settings.webhook_url ?? ''}
          placeholder="one your admin allows"
          onChange={e => setSettings({ ...settings, webhook_url: e.target.value })}
        />
      </label>
      <label>
        E-mail
        <input
          className={`jp-mod-styled${invalid('email')}`}
          value={settings.email ?? ''}
          onChange={e => setSettings({ ...settings, email: e.target.value })}
        />
      </label>
      {settings.pending + settings.failed > 0 && (
        <div className="jp-gpulab-reason">
          {settings.pending} to deliver, {settings.failed} given up on
        </div>
      )}
      <ErrorLine error={error?.message ?? null} />
      <button className="jp-gpulab-button" type="submit">
        Save
      </button>
    </form>
  );
}
