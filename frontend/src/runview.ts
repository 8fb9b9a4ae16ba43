/** One run's column: loss and gradient-norm charts, layer heatmap, NaN origin. */

import { fetchInfo, fetchMatrix, fetchSeries } from "./api";
import { LineChart, type Marker } from "./charts";
import { clear, el, fmt } from "./dom";
import { badge } from "./findings";
import { Heatmap } from "./heatmap";
import { cssVar } from "./theme";
import type { Finding, LossChoice, RunSummary } from "./types";

const MARKED_KINDS = new Set(["loss_spike", "final_step_spike", "nan_inf", "divergence"]);
const MARKER_LABEL: Record<string, string> = {
  loss_spike: "spike", final_step_spike: "final-step spike", nan_inf: "NaN", divergence: "diverges",
};
/** The chart label of a marked finding: a blow-up in the first steps is not a run that "diverges". */
function markerLabel(finding: Finding): string {
  if (finding.kind === "divergence" && finding.evidence.early_blowup) return "blow-up";
  return MARKER_LABEL[finding.kind] ?? finding.kind;
}
const QUANTITY_ORDER = ["grad_norm", "update_ratio", "weight_norm", "dead_fraction", "saturated_fraction", "act_std", "act_mean"];

/** A loss-like series where the server names none (a held-out split, an older server). */
function guessLoss(summary: RunSummary): LossChoice | null {
  if (summary.series.steps.includes("loss")) return { source: "steps", tag: "loss" };
  if (summary.series.per_batch?.includes("batch_loss")) return { source: "per_batch", tag: "batch_loss" };
  const scalars = summary.series.scalars;
  const tag = ["loss", "epoch_loss", "batch_loss"].find((t) => scalars.includes(t)) ?? scalars.find((t) => /loss/i.test(t));
  return tag ? { source: "scalars", tag } : null;
}

/** The loss series to chart as [tag, source, title]: the one the findings were computed on. */
function pickLoss(summary: RunSummary): [string, string, string] | null {
  const chosen = summary.loss ?? guessLoss(summary);
  if (!chosen) return null;
  const title = chosen.source === "steps" ? "raw per-step loss"
    : chosen.source === "per_batch" ? "per-batch loss (recovered from Keras' running-mean batch_loss)"
    : chosen.tag === "batch_loss" ? "batch_loss (Keras' running epoch mean)" : chosen.tag;
  return [chosen.tag, chosen.source, title];
}

export class RunView {
  readonly root: HTMLElement;
  private charts: LineChart[] = [];
  private heatmap: Heatmap | null = null;
  private readonly heatHolder: HTMLElement;
  private readonly chartHolder: HTMLElement;
  private readonly quantities: string[];
  private quantity: string | null;
  private focused: Finding | null = null;

  constructor(parent: HTMLElement, private readonly summary: RunSummary, private readonly findings: Finding[]) {
    this.quantities = [...summary.matrices.variables, ...summary.matrices.layers]
      .sort((a, b) => (QUANTITY_ORDER.indexOf(a) + 99) % 99 - (QUANTITY_ORDER.indexOf(b) + 99) % 99);
    this.quantity = this.quantities[0] ?? null;
    const reset = el("button", { type: "button", class: "reset" }, ["Full range"]);
    reset.addEventListener("click", () => this.reset());
    this.root = el("section", { class: "run-view", data: { run: summary.run } }, [
      el("header", {}, [badge(summary.worst_severity), " ", el("span", { class: "run-name" }, [summary.run]), " ", reset]),
    ]);
    this.chartHolder = el("div", { class: "charts" });
    this.heatHolder = el("div", { class: "heat" });
    this.root.appendChild(this.chartHolder);
    if (this.quantities.length) {
      const select = el("select", { class: "quantity", title: "Per-layer quantity" });
      for (const q of this.quantities) {
        const option = el("option", {}, [q]);
        option.value = q;
        select.appendChild(option);
      }
      select.addEventListener("change", () => { this.quantity = select.value; void this.loadHeatmap(); });
      this.root.appendChild(el("div", { class: "heat-controls" }, ["layer × step: ", select]));
    }
    this.root.appendChild(this.heatHolder);
    parent.appendChild(this.root);
  }

  /** Fetches and draws everything; resolves when the charts exist. */
  async load(): Promise<void> {
    const markers = this.markers();
    const syncKey = `run:${this.summary.run}`;
    const wanted: [string, string, string, boolean, string][] = [];
    const gan = this.summary.adversarial;
    const loss = gan ? null : pickLoss(this.summary);
    if (gan) {
      wanted.push([gan.generator, "scalars", `generator loss (${gan.generator})`, false, cssVar("--series-loss") || "#1976d2"]);
      wanted.push([gan.discriminator, "scalars", `discriminator loss (${gan.discriminator})`, false, cssVar("--series-grad") || "#ef6c00"]);
    }
    if (loss) wanted.push([loss[0], loss[1], loss[2], false, cssVar("--series-loss") || "#1976d2"]);
    if (this.summary.series.steps.includes("grad_norm")) {
      wanted.push(["grad_norm", "steps", "global gradient norm (log)", true, cssVar("--series-grad") || "#ef6c00"]);
    }
    const responses = await Promise.all(wanted.map(([tag, source]) => fetchSeries(this.summary.run, tag, source)));
    clear(this.chartHolder);
    this.charts = responses.map((series, i) => new LineChart(this.chartHolder, series, {
      title: wanted[i][2], logY: wanted[i][3], color: wanted[i][4], syncKey, markers,
    }));
    if (!this.charts.length) this.chartHolder.appendChild(el("p", { class: "muted" }, ["No per-step series in this run."]));
    if (this.summary.has_nan_origin) await this.loadNanOrigin();
    await this.loadHeatmap();
    this.root.dataset.loaded = "true";
    if (this.focused) this.focus(this.focused);
  }

  /** Zooms every chart of this run to the finding's steps and outlines its layers. */
  focus(finding: Finding): void {
    this.focused = finding;
    if (finding.first_step === null) { this.reset(); return; }
    const first = finding.first_step;
    const last = finding.last_step ?? first;
    for (const chart of this.charts) chart.focus(first, last);
    this.heatmap?.focus(first, last, finding.layers);
    this.root.dataset.focus = `${first}-${last}`;
  }

  reset(): void {
    this.focused = null;
    for (const chart of this.charts) chart.reset();
    this.heatmap?.reset();
    delete this.root.dataset.focus;
  }

  destroy(): void {
    for (const chart of this.charts) chart.destroy();
    this.root.remove();
  }

  private markers(): Marker[] {
    const colors: Record<string, string> = {
      critical: cssVar("--critical") || "#d32f2f",
      warning: cssVar("--warning") || "#f9a825",
      info: cssVar("--info") || "#0288d1",
    };
    return this.findings
      .filter((f) => MARKED_KINDS.has(f.kind) && f.first_step !== null)
      .map((f) => ({ first: f.first_step as number, last: f.last_step ?? (f.first_step as number), color: colors[f.severity] ?? "#888", label: markerLabel(f) }));
  }

  private async loadHeatmap(): Promise<void> {
    if (!this.quantity) return;
    const matrix = await fetchMatrix(this.summary.run, this.quantity);
    clear(this.heatHolder);
    this.heatmap = new Heatmap(this.heatHolder, matrix);
    if (this.focused && this.focused.first_step !== null) {
      this.heatmap.focus(this.focused.first_step, this.focused.last_step ?? this.focused.first_step, this.focused.layers);
    }
  }

  private async loadNanOrigin(): Promise<void> {
    const info = await fetchInfo(this.summary.run);
    const records = info.records["stability/nan_origin"] ?? [];
    if (!records.length) return;
    const first = records[0];
    const rows = el("table", { class: "evidence" });
    const value = first.value;
    if (value && typeof value === "object") {
      for (const [key, v] of Object.entries(value as Record<string, unknown>)) {
        rows.appendChild(el("tr", {}, [el("th", {}, [key]), el("td", {}, [fmt(v)])]));
      }
    } else {
      rows.appendChild(el("tr", {}, [el("td", {}, [fmt(value)])]));
    }
    this.root.insertBefore(
      el("div", { class: "nan-origin" }, [el("strong", {}, [`First non-finite value at step ${first.step}`]), rows]),
      this.chartHolder,
    );
  }
}
