/**
 * The Pipelines tab: the user's recent pipelines (GET pipelines), each drawn as its graph of steps (which ran,
 * which failed, which was cancelled because what it needed did not succeed), with Cancel while one runs.
 */

import * as React from 'react';

import { getJSON, IPipeline, IPipelineStep } from './api';
import { ago, ErrorLine, useAct, usePolling } from './common';

export interface IStep extends IPipelineStep {
  depth: number;
}

/** Each step with its depth: one more than the deepest step it needs (0 for those that need none). */
export function layered(pipeline: IPipeline): IStep[] {
  const byName = new Map(pipeline.steps.map(s => [s.name, s]));
  const depths = new Map<string, number>(); // computed once each (a DAG shares its ancestors)
  const depthOf = (name: string, seen: Set<string>): number => {
    const known = depths.get(name);
    if (known !== undefined) {
      return known;
    }
    const needs = (byName.get(name)?.needs ?? []).filter(n => byName.has(n) && !seen.has(n));
    const depth = needs.length === 0 ? 0 : 1 + Math.max(...needs.map(n => depthOf(n, new Set([...seen, name]))));
    depths.set(name, depth);
    return depth;
  };
  return pipeline.steps.map(step => ({ ...step, depth: depthOf(step.name, new Set()) }));
}

/** A step's state as shown: a job deleted since has none. */
function stateOf(step: IPipelineStep): string {
  return step.state ?? 'deleted';
}

/** A step's tooltip: its state and reason, and what it needs. */
export function describe(step: IPipelineStep): string {
  const reason = step.state_reason ? ` (${step.state_reason})` : '';
  return `${step.name}: ${stateOf(step)}${reason}${step.needs.length ? `; needs ${step.needs.join(', ')}` : ''}`;
}

const NODE_W = 100;
const NODE_H = 36;
const GAP_X = 28;
const GAP_Y = 14;

/** One run's steps as a left-to-right graph: a column per depth, an arrow from each step to those that need it. */
export function PipelineGraph(props: { pipeline: IPipeline }): JSX.Element {
  const steps = layered(props.pipeline);
  const columns = new Map<number, IStep[]>();
  for (const step of steps) {
    columns.set(step.depth, [...(columns.get(step.depth) ?? []), step]);
  }
  const where = new Map<string, { x: number; y: number }>();
  for (const [depth, steps] of columns) {
    steps
      .sort((a, b) => a.name.localeCompare(b.name))
      .forEach((s, i) => where.set(s.name, { x: depth * (NODE_W + GAP_X), y: i * (NODE_H + GAP_Y) }));
  }
  const width = Math.max(...Array.from(columns.keys()).map(d => (d + 1) * (NODE_W + GAP_X))) - GAP_X + 2;
  const height = Math.max(...Array.from(columns.values()).map(c => c.length)) * (NODE_H + GAP_Y) - GAP_Y + 2;
  return (
    <svg
      className="jp-gpulab-graph"
      width={width}
      height={height}
      role="img"
      aria-label={`Pipeline ${props.pipeline.name}`}
    >
      <defs>
        <marker
          id="jp-gpulab-arrow"
          viewBox="0 0 10 10"
          refX="10"
          refY="5"
          markerWidth="6"
          markerHeight="6"
          orient="auto"
        >
          <path d="M 0 0 L 10 5 L 0 10 z" className="jp-gpulab-graph-arrow" />
        </marker>
      </defs>
      {steps.flatMap(step =>
        step.needs.map(need => {
          const from = where.get(need)!;
          const to = where.get(step.name)!;
          return (
            <line
              key={`${need}->${step.name}`}
              className="jp-gpulab-graph-edge"
              x1={from.x + NODE_W}
              y1={from.y + NODE_H / 2 + 1}
              x2={to.x}
              y2={to.y + NODE_H / 2 + 1}
              markerEnd="url(#jp-gpulab-arrow)"
            />
          );
        })
      )}
      {steps.map(step => {
        const { x, y } = where.get(step.name)!;
        return (
          <g
            key={step.name}
            transform={`translate(${x + 1},${y + 1})`}
            data-step={step.name}
            data-state={stateOf(step)}
          >
            <title>{describe(step)}</title>
            <rect
              className={`jp-gpulab-graph-node jp-gpulab-state-${stateOf(step)}`}
              width={NODE_W}
              height={NODE_H}
              rx={4}
            />
            <text x={8} y={15} className="jp-gpulab-graph-name">
              {step.name}
            </text>
            <text x={8} y={29} className="jp-gpulab-graph-state">
              {stateOf(step)}
            </text>
          </g>
        );
      })}
    </svg>
  );
}

export function PipelinesView(props: { visible: () => boolean }): JSX.Element {
  const [pipelines, loadError, refresh] = usePolling(
    async () => (await getJSON<{ pipelines: IPipeline[] }>('pipelines?limit=50')).pipelines,
    props.visible
  );
  const [error, act] = useAct(refresh);
  return (
    <div className="jp-gpulab-section">
      <ErrorLine error={error ?? loadError} />
      {pipelines && pipelines.length === 0 && (
        <p className="jp-gpulab-empty">
          No pipelines yet. Run one with "Run pipeline" on a .yaml file, or gpulab pipeline submit.
        </p>
      )}
      {pipelines && pipelines.length > 0 && (
        <ul className="jp-gpulab-list jp-gpulab-pipelines">
          {pipelines.map(p => (
            <li key={p.id} className="jp-gpulab-card" data-pipeline={p.id} title={`${p.id}\n${p.directory}`}>
              <div className="jp-gpulab-card-head">
                <span className="jp-gpulab-name">{p.name}</span>
                <span className={`jp-gpulab-state jp-gpulab-state-${p.state}`}>{p.state}</span>
              </div>
              <div className="jp-gpulab-graph-box">
                <PipelineGraph pipeline={p} />
              </div>
              <div className="jp-gpulab-card-foot">
                <span className="jp-gpulab-reason">
                  {ago(p.created_at)}
                  {p.schedule_id ? ' · scheduled' : ''}
                </span>
                <span className="jp-gpulab-actions">
                  {(p.state === 'queued' || p.state === 'running') && (
                    <button
                      className="jp-gpulab-button"
                      onClick={() => act(`Cancel ${p.name}`, 'POST', `pipelines/${p.id}/cancel`)}
                    >
                      Cancel
                    </button>
                  )}
                </span>
              </div>
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}
