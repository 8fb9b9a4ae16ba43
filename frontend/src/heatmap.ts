/**
 * Layer x step heatmap on a plain <canvas>: log colour scale for norms and
 * ratios, linear 0..1 for fractions; non-finite cells in the critical colour,
 * zeros on a log scale in the missing-cell colour (both in the legend).
 * Layer names are drawn by the canvas (inert) and shown in a text tooltip.
 */

import { el, fmt } from "./dom";
import { cssVar } from "./theme";
import type { MatrixResponse } from "./types";
import { toNumber } from "./types";

const STOPS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]; // viridis
const ROW_MIN = 6;
const ROW_MAX = 16;
const AXIS_H = 18;

function hexToRgb(hex: string): [number, number, number] {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}
const STOP_RGB = STOPS.map(hexToRgb);

function colorAt(t: number): string {
  const x = Math.min(1, Math.max(0, t)) * (STOP_RGB.length - 1);
  const i = Math.min(STOP_RGB.length - 2, Math.floor(x));
  const f = x - i;
  const a = STOP_RGB[i];
  const b = STOP_RGB[i + 1];
  const c = a.map((v, k) => Math.round(v + (b[k] - v) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

/** Whether a quantity is drawn on a log scale (fractions and means are linear). */
export function isLogQuantity(quantity: string): boolean {
  return !/fraction|mean/.test(quantity);
}

export class Heatmap {
  readonly root: HTMLElement;
  private readonly canvas: HTMLCanvasElement;
  private readonly tooltip: HTMLElement;
  private readonly log: boolean;
  private lo = 0;
  private hi = 1;
  private offScale = false; // a value <= 0 on a log scale (a variable without gradient)
  private absent = false; // a cell no record held (null: e.g. a layer unfrozen later)
  private colStart = 0;
  private colEnd: number;
  private highlight = new Set<string>();
  private band: [number, number] | null = null;

  constructor(parent: HTMLElement, private readonly matrix: MatrixResponse) {
    this.log = isLogQuantity(matrix.quantity);
    this.colEnd = matrix.steps.length;
    this.root = el("div", { class: "heatmap", data: { quantity: matrix.quantity, run: matrix.run } });
    this.canvas = el("canvas", { class: "heatmap-canvas" });
    this.tooltip = el("div", { class: "heatmap-tooltip muted" }, ["hover a cell"]);
    this.computeRange();
    const notes: string[] = [];
    if (matrix.downsampled) notes.push(`${matrix.total_steps} logged steps in ${matrix.steps.length} columns (max per column)`);
    if (matrix.truncated_names) notes.push(`first ${matrix.names.length} of ${matrix.total_names} names`);
    this.root.appendChild(el("div", { class: "chart-title" }, [
      `${matrix.group === "layers" ? "per-layer" : "per-variable"} ${matrix.quantity}`,
      el("span", { class: "muted" }, [` ${this.log ? "log" : "linear"} scale ${fmt(this.lo)} .. ${fmt(this.hi)}`]),
      notes.length ? el("span", { class: "muted" }, [` (${notes.join("; ")})`]) : null,
    ]));
    this.root.appendChild(this.canvas);
    this.root.appendChild(this.legend());
    this.root.appendChild(this.tooltip);
    parent.appendChild(this.root);
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.draw();
  }

  /** Shows only the columns overlapping [first, last] (with context) and outlines layers. */
  focus(first: number, last: number, layers: string[]): void {
    const steps = this.matrix.steps;
    const ends = this.matrix.step_ends;
    const span = Math.max(last - first, 10);
    const lo = first - 2 * span;
    const hi = last + 2 * span;
    let start = steps.findIndex((_, i) => ends[i] >= lo);
    let end = steps.length;
    for (let i = steps.length - 1; i >= 0; i--) if (steps[i] <= hi) { end = i + 1; break; }
    if (start < 0 || end <= start) { start = 0; end = steps.length; }
    this.colStart = start;
    this.colEnd = end;
    this.band = [first, last];
    this.highlight = new Set(layers.filter((name) => this.matrix.names.includes(name)));
    this.draw();
  }

  reset(): void {
    this.colStart = 0;
    this.colEnd = this.matrix.steps.length;
    this.band = null;
    this.highlight.clear();
    this.draw();
  }

  private computeRange(): void {
    let lo = Infinity;
    let hi = -Infinity;
    for (const row of this.matrix.values) {
      for (const raw of row) {
        if (raw === null) { this.absent = true; continue; }
        const v = toNumber(raw);
        if (this.log && v <= 0) this.offScale = true;
        if (!Number.isFinite(v) || (this.log && v <= 0)) continue;
        const x = this.log ? Math.log10(v) : v;
        lo = Math.min(lo, x);
        hi = Math.max(hi, x);
      }
    }
    if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
    if (!this.log && /fraction/.test(this.matrix.quantity)) { lo = 0; hi = Math.max(hi, 1); }
    if (hi - lo < 1e-12) hi = lo + 1;
    this.lo = this.log ? 10 ** lo : lo;
    this.hi = this.log ? 10 ** hi : hi;
  }

  private scaled(v: number): number {
    if (this.log) return (Math.log10(v) - Math.log10(this.lo)) / (Math.log10(this.hi) - Math.log10(this.lo));
    return (v - this.lo) / (this.hi - this.lo);
  }

  private legend(): HTMLElement {
    const bar = el("canvas", { class: "heatmap-legend" });
    bar.width = 160;
    bar.height = 10;
    const ctx = bar.getContext("2d");
    if (ctx) for (let x = 0; x < 160; x++) { ctx.fillStyle = colorAt(x / 159); ctx.fillRect(x, 0, 1, 10); }
    const bad = el("span", { class: "swatch swatch-nonfinite" });
    const greyLabel = [this.offScale ? "0" : "", this.absent ? "not recorded" : ""].filter(Boolean).join(" or ");
    const zero = greyLabel ? ["   ", el("span", { class: "swatch swatch-missing" }), ` ${greyLabel}`] : [];
    return el("div", { class: "legend" }, [fmt(this.lo), " ", bar, " ", fmt(this.hi), "   ", bad, " non-finite", ...zero]);
  }

  private layout() {
    const names = this.matrix.names;
    const width = Math.max(300, this.root.clientWidth || 600);
    const labelW = Math.min(220, Math.max(80, 7 * Math.max(0, ...names.map((n) => Math.min(n.length, 32)))));
    const rowH = Math.max(ROW_MIN, Math.min(ROW_MAX, Math.floor(360 / Math.max(1, names.length))));
    const cols = Math.max(1, this.colEnd - this.colStart);
    const cellW = (width - labelW) / cols;
    return { width, labelW, rowH, cols, cellW, height: names.length * rowH + AXIS_H };
  }

  private draw(): void {
    const { width, labelW, rowH, cellW, height } = this.layout();
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(height * dpr);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    const ctx = this.canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const fg = cssVar("--fg") || "#222";
    const missing = cssVar("--cell-missing") || "#bbb";
    const nonfinite = cssVar("--critical") || "#d32f2f";
    const { names, values, steps, step_ends: ends } = this.matrix;
    ctx.font = `${Math.min(11, rowH)}px sans-serif`;
    ctx.textBaseline = "middle";
    names.forEach((name, j) => {
      const y = j * rowH;
      const label = name.length > 32 ? `…${name.slice(-31)}` : name;
      ctx.fillStyle = this.highlight.has(name) ? nonfinite : fg;
      if (rowH >= 8) ctx.fillText(label, 2, y + rowH / 2, labelW - 6);
      for (let i = this.colStart; i < this.colEnd; i++) {
        const raw = values[i][j];
        const v = raw === null ? 0 : toNumber(raw);
        ctx.fillStyle = raw === null ? missing : !Number.isFinite(v) ? nonfinite
          : this.log && v <= 0 ? missing : colorAt(this.scaled(v));
        ctx.fillRect(labelW + (i - this.colStart) * cellW, y, Math.ceil(cellW), rowH - (rowH > 8 ? 1 : 0));
      }
      if (this.highlight.has(name)) {
        ctx.strokeStyle = nonfinite;
        ctx.lineWidth = 2;
        ctx.strokeRect(labelW, y + 1, width - labelW - 1, rowH - 2);
      }
    });
    if (this.band) {
      const x0 = this.colOf(this.band[0]);
      const x1 = this.colOf(this.band[1]);
      ctx.strokeStyle = cssVar("--band-line") || "#ffb300";
      ctx.lineWidth = 2;
      ctx.strokeRect(labelW + x0 * cellW, 0, Math.max(cellW, (x1 - x0 + 1) * cellW), names.length * rowH);
    }
    ctx.fillStyle = fg;
    const first = steps[this.colStart] ?? 0;
    const last = ends[this.colEnd - 1] ?? first;
    ctx.textBaseline = "top";
    ctx.fillText(`step ${first}`, labelW, names.length * rowH + 4);
    const lastLabel = `step ${last}`;
    ctx.fillText(lastLabel, width - ctx.measureText(lastLabel).width - 2, names.length * rowH + 4);
    this.root.dataset.xMin = String(first);
    this.root.dataset.xMax = String(last);
  }

  private colOf(step: number): number {
    const { steps, step_ends: ends } = this.matrix;
    for (let i = this.colStart; i < this.colEnd; i++) if (ends[i] >= step) return i - this.colStart;
    return Math.max(0, this.colEnd - this.colStart - 1);
  }

  private hover(event: MouseEvent): void {
    const { labelW, rowH, cellW } = this.layout();
    const rect = this.canvas.getBoundingClientRect();
    const x = event.clientX - rect.left;
    const y = event.clientY - rect.top;
    const j = Math.floor(y / rowH);
    const name = this.matrix.names[j];
    if (name === undefined) return;
    if (x < labelW) { this.tooltip.textContent = name; return; }
    const i = this.colStart + Math.floor((x - labelW) / cellW);
    if (i >= this.colEnd) return;
    const a = this.matrix.steps[i];
    const b = this.matrix.step_ends[i];
    const range = a === b ? `step ${a}` : `steps ${a}–${b}`;
    const raw = this.matrix.values[i][j];
    this.tooltip.textContent = `${name} @ ${range}: ${raw === null ? "not recorded" : fmt(toNumber(raw))}`;
  }
}
