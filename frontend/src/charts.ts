/** Per-step line charts (uPlot) with finding markers, non-finite ticks and zoom. */

import uPlot from "uplot";
import { axisLabel, el } from "./dom";
import { cssVar } from "./theme";
import type { SeriesResponse } from "./types";
import { toNumber } from "./types";

export interface Marker {
  first: number;
  last: number;
  color: string;
  label: string;
}

export interface LineChartOptions {
  title: string;
  logY: boolean;
  syncKey: string;
  markers: Marker[];
  color: string;
}

const HEIGHT = 170;

/** One uPlot chart of one series; exposes its x-range as data-x-min/-max and its
 * markers as data-markers (`label@first-last`, `;`-separated). */
export class LineChart {
  readonly root: HTMLElement;
  private plot: uPlot | null = null;
  private band: [number, number] | null = null;
  private readonly xs: number[];
  private readonly resize: ResizeObserver | null = null;

  constructor(parent: HTMLElement, private readonly series: SeriesResponse, private readonly opts: LineChartOptions) {
    const marked = opts.markers.map((m) => `${m.label}@${m.first}-${m.last}`).join(";");
    this.root = el("div", { class: "chart", data: { tag: series.tag, run: series.run, markers: marked } });
    const note = series.downsampled
      ? ` (${series.steps.length} of ${series.total_points} points, min/max kept)`
      : "";
    this.root.appendChild(el("div", { class: "chart-title" }, [opts.title, el("span", { class: "muted" }, [note])]));
    const holder = el("div", { class: "chart-canvas" });
    this.root.appendChild(holder);
    parent.appendChild(this.root);
    this.xs = series.steps.slice();
    const ys = series.values.map((v) => {
      const n = toNumber(v);
      if (!Number.isFinite(n)) return null;
      if (opts.logY && n <= 0) return null;
      return n;
    });
    const width = Math.max(280, holder.clientWidth || parent.clientWidth || 480);
    const axis = cssVar("--fg-muted") || "#666";
    const grid = cssVar("--grid") || "rgba(128,128,128,0.2)";
    const options: uPlot.Options = {
      width,
      height: HEIGHT,
      legend: { show: false },
      cursor: { sync: { key: opts.syncKey }, drag: { x: true, y: false } },
      scales: { x: { time: false }, y: opts.logY ? { distr: 3 } : {} },
      axes: [
        { stroke: axis, grid: { stroke: grid }, ticks: { stroke: grid } },
        { stroke: axis, grid: { stroke: grid }, ticks: { stroke: grid }, size: 60,
          values: (_u: uPlot, splits: (number | null)[]) => splits.map(axisLabel) },
      ],
      series: [{ label: "step" }, { label: series.tag, stroke: opts.color, width: 1.25, spanGaps: false, points: { show: false } }],
      hooks: {
        draw: [(u: uPlot) => this.drawOverlay(u)],
        setScale: [(u: uPlot, key: string) => { if (key === "x") this.recordRange(u); }],
      },
    };
    const data: uPlot.AlignedData = [this.xs, ys as (number | null)[]];
    this.plot = new uPlot(options, data, holder);
    this.recordRange(this.plot);
    if (typeof ResizeObserver !== "undefined") {
      this.resize = new ResizeObserver(() => {
        const w = Math.max(280, holder.clientWidth);
        if (this.plot && Math.abs(this.plot.width - w) > 4) this.plot.setSize({ width: w, height: HEIGHT });
      });
      this.resize.observe(holder);
    }
  }

  /** Zooms to [first, last] with some context and shades that range. */
  focus(first: number, last: number): void {
    if (!this.plot || this.xs.length === 0) return;
    this.band = [first, last];
    const lo = this.xs[0];
    const hi = this.xs[this.xs.length - 1];
    const span = Math.max(last - first, 10);
    const min = Math.max(lo, first - 2 * span);
    const max = Math.min(hi, last + 2 * span);
    this.plot.setScale("x", { min: Math.min(min, first), max: Math.max(max, last, min + 1) });
  }

  /** Shows the full step range again. */
  reset(): void {
    if (!this.plot || this.xs.length === 0) return;
    this.band = null;
    this.plot.setScale("x", { min: this.xs[0], max: this.xs[this.xs.length - 1] });
  }

  destroy(): void {
    this.resize?.disconnect();
    this.plot?.destroy();
    this.plot = null;
    this.root.remove();
  }

  private recordRange(u: uPlot): void {
    const scale = u.scales.x;
    if (scale.min !== undefined && scale.min !== null) this.root.dataset.xMin = String(Math.round(scale.min));
    if (scale.max !== undefined && scale.max !== null) this.root.dataset.xMax = String(Math.round(scale.max));
  }

  private drawOverlay(u: uPlot): void {
    const ctx = u.ctx;
    const { left, top, width, height } = u.bbox;
    const dpr = uPlot.pxRatio;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    if (this.band) {
      const x0 = u.valToPos(this.band[0], "x", true);
      const x1 = u.valToPos(this.band[1], "x", true);
      ctx.fillStyle = cssVar("--band") || "rgba(255,193,7,0.25)";
      ctx.fillRect(Math.min(x0, x1) - 2 * dpr, top, Math.max(Math.abs(x1 - x0), 0) + 4 * dpr, height);
    }
    for (const marker of this.opts.markers) {
      const x = u.valToPos(marker.first, "x", true);
      ctx.strokeStyle = marker.color;
      ctx.lineWidth = 1.5 * dpr;
      ctx.setLineDash([4 * dpr, 3 * dpr]);
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = marker.color;
      ctx.font = `${10 * dpr}px sans-serif`;
      ctx.fillText(marker.label, x + 3 * dpr, top + 11 * dpr);
    }
    ctx.fillStyle = cssVar("--critical") || "#d32f2f";
    for (const step of this.series.nonfinite) {
      const x = u.valToPos(step, "x", true);
      ctx.beginPath();
      ctx.moveTo(x, top + height);
      ctx.lineTo(x - 4 * dpr, top + height - 8 * dpr);
      ctx.lineTo(x + 4 * dpr, top + height - 8 * dpr);
      ctx.closePath();
      ctx.fill();
    }
    ctx.restore();
  }
}
