/**
 * The Pipelines tab: the user's recent pipeline runs (jobs labelled `gpulab.pipeline`), each drawn as its graph of
 * steps (which ran, which failed, which was cancelled because what it needed did not succeed).
 */

import * as React from 'react';

import { getJSON, IJob } from './api';
import { ErrorLine, usePolling } from './common';

export const PIPELINE_LABEL = 'gpulab.pipeline';
export const STEP_LABEL = 'gpulab.step';

export interface IStep {
  name: string;
  job: IJob;
  needs: string[];
  depth: number;
}

export interface IPipeline {
  run: string;
  steps: IStep[];
  created: string;
}

/** Group jobs into pipeline runs; each step's depth is one more than the deepest step it needs. */
export function pipelinesOf(jobs: IJob[]): IPipeline[] {
  const runs = new Map<string, IJob[]>();
  for (const job of jobs) {
    const run = job.labels?.[PIPELINE_LABEL];
    if (run) {
      runs.set(run, [...(runs.get(run) ?? []), job]);
    }
  }
  return Array.from(runs, ([run, members]) => {
    const byId = new Map(members.map(j => [j.id, j]));
    const steps = new Map<string, IStep>();
    const needed = (job: IJob) => (job.spec.depends_on ?? []).map(d => byId.get(d.job)).filter((j): j is IJob => !!j);
    const depths = new Map<string, number>(); // each job's depth, computed once (a DAG shares its ancestors)
    const depthOf = (job: IJob, seen: Set<string>): number => {
      const known = depths.get(job.id);
      if (known !== undefined) {
        return known;
      }
      const needs = needed(job);
      const depth =
        seen.has(job.id) || needs.length === 0
          ? 0
          : 1 + Math.max(...needs.map(n => depthOf(n, new Set([...seen, job.id]))));
      depths.set(job.id, depth);
      return depth;
    };
    for (const job of members) {
      const name = job.labels?.[STEP_LABEL] ?? job.name;
      const needs = needed(job).map(j => j.labels?.[STEP_LABEL] ?? j.name);
      steps.set(name, { name, job, needs, depth: depthOf(job, new Set()) });
    }
    const created = members.map(j => j.created_at).sort()[0];
    return { run, steps: Array.from(steps.values()), created };
  }).sort((a, b) => b.created.localeCompare(a.created));
}

/** A step's tooltip: its state and reason, and what it needs. */
export function describe(step: IStep): string {
  const reason = step.job.state_reason ? ` (${step.job.state_reason})` : '';
  return `${step.name}: ${step.job.state}${reason}${step.needs.length ? `; needs ${step.needs.join(', ')}` : ''}`;
}

const NODE_W = 100;
const NODE_H = 36;
const GAP_X = 28;
const GAP_Y = 14;

/** One run's steps as a left-to-right graph: a column per depth, an arrow from each step to those that need it. */
export function PipelineGraph(props: { pipeline: IPipeline }): JSX.Element {
  const columns = new Map<number, IStep[]>();
  for (const step of props.pipeline.steps) {
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
      aria-label={`Pipeline ${props.pipeline.run}`}
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
      {props.pipeline.steps.flatMap(step =>
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
      {props.pipeline.steps.map(step => {
        const { x, y } = where.get(step.name)!;
        return (
          <g
            key={step.name}
            transform={`translate(${x + 1},${y + 1})`}
            data-step={step.name}
            data-state={step.job.state}
          >
            <title>{describe(step)}</title>
            <rect
              className={`jp-gpulab-graph-node jp-gpulab-state-${step.job.state}`}
              width={NODE_W}
              height={NODE_H}
              rx={4}
            />
            <text x={8} y={15} className="jp-gpulab-graph-name">
              {step.name}
            </text>
            <text x={8} y={29} className="jp-gpulab-graph-state">
              {step.job.state}
            </text>
          </g>
        );
      })}
    </svg>
  );
}

export function PipelinesView(props: { visible: () => boolean }): JSX.Element {
  const [jobs, error] = usePolling(async () => (await getJSON<{ jobs: IJob[] }>('jobs?limit=200')).jobs, props.visible);
  const pipelines = jobs ? pipelinesOf(jobs) : null;
  return (
    <div className="jp-gpulab-section">
      <ErrorLine error={error} />
      {pipelines && pipelines.length === 0 && (
        <p className="jp-gpulab-empty">
          No pipelines among your latest jobs. Run one with "Run pipeline" on a .yaml file, or gpulab pipeline submit.
        </p>
      )}
      {pipelines && pipelines.length > 0 && (
        <ul className="jp-gpulab-list jp-gpulab-pipelines">
          {pipelines.map(p => (
            <li key={p.run} className="jp-gpulab-card" data-pipeline={p.run}>
              <div className="jp-gpulab-card-head">
                <span className="jp-gpulab-name">{p.run}</span>
              </div>
              <div className="jp-gpulab-graph-box">
                <PipelineGraph pipeline={p} />
              </div>
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}
