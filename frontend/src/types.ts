/** Shapes of the plugin's JSON routes (see tb_stability/plugin/http_api.md). */

export type Severity = "critical" | "warning" | "info";
export const SEVERITIES: Severity[] = ["critical", "warning", "info"];

/** A JSON number as the server spells it: non-finite values are strings. */
export type JsonNumber = number | "nan" | "inf" | "-inf";

export interface RunSummary {
  run: string;
  worst_severity: Severity | null;
  counts: Record<Severity, number>;
  kinds: string[];
  warnings: number;
  instrumented: boolean;
  /** False when the run holds no scalar and no stability data: nothing was checked. */
  checked: boolean;
  /** per_batch: running-mean tags whose per-batch values the server recovers. */
  series: { steps: string[]; scalars: string[]; per_batch?: string[] };
  matrices: { variables: string[]; layers: string[] };
  has_nan_origin: boolean;
  /** The training loss the detectors read; null for a held-out split or a run without one. */
  loss?: LossChoice | null;
  /** A GAN's two scalar loss tags: charted side by side instead of one loss. */
  adversarial?: { generator: string; discriminator: string } | null;
}

/** A loss series: where `/series` finds it (`source`) and its tag. */
export interface LossChoice {
  source: "steps" | "per_batch" | "scalars";
  tag: string;
}

export interface RunsResponse {
  runs: RunSummary[];
  warnings: string[];
}

export interface Finding {
  kind: string;
  severity: Severity;
  run: string;
  first_step: number | null;
  last_step: number | null;
  layers: string[];
  evidence: Record<string, unknown>;
  explanation: string;
  remedy: string;
}

export interface Report {
  version: number;
  runs: { run: string; findings: Finding[]; warnings: string[]; truncated?: boolean; total_findings?: number }[];
  warnings: string[];
  /** Set by the plugin when it capped the response (see http_api.md). */
  truncated?: boolean;
  total_runs?: number;
}

export interface SeriesResponse {
  run: string;
  tag: string;
  source: string;
  steps: number[];
  values: JsonNumber[];
  total_points: number;
  downsampled: boolean;
  nonfinite: number[];
}

export interface MatrixResponse {
  run: string;
  quantity: string;
  group: string;
  names: string[];
  steps: number[];
  step_ends: number[];
  values: (JsonNumber | null)[][]; // null: not recorded (variables that changed)
  total_steps: number;
  total_names: number;
  downsampled: boolean;
  truncated_names: boolean;
}

export interface InfoResponse {
  run: string;
  records: Record<string, { step: number; value: unknown }[]>;
  warnings: string[];
}

/** Converts a server number to a JS number (NaN/±Infinity for strings). */
export function toNumber(value: JsonNumber): number {
  if (typeof value === "number") return value;
  if (value === "inf") return Infinity;
  if (value === "-inf") return -Infinity;
  return NaN;
}

export function severityRank(severity: string): number {
  const rank = SEVERITIES.indexOf(severity as Severity);
  return rank < 0 ? SEVERITIES.length : rank;
}
