/**
 * Entry point of the Stability panel. TensorBoard loads this ES module in an
 * iframe whose <base> is the plugin's route prefix and calls `render()`.
 */

import { fetchReport, fetchRuns } from "./api";
import { clear, el } from "./dom";
import { badge, findingKey, renderFindings, sortFindings } from "./findings";
import { RunView } from "./runview";
import { watchTheme } from "./theme";
import type { Finding, Report, RunSummary } from "./types";
import { SEVERITIES, severityRank } from "./types";

const DEFAULT_VISIBLE_RUNS = 2;

class App {
  private runs: RunSummary[] = [];
  private report: Report = { version: 1, runs: [], warnings: [] };
  private selected = new Set<string>();
  private views = new Map<string, RunView>();
  private selectedFinding: string | null = null;
  private filter = "";
  private minSeverity = "info";
  private readonly runList = el("ul", { class: "run-list" });
  private readonly findingList = el("div", { class: "finding-list" });
  private readonly viewHolder = el("div", { class: "run-views" });
  private readonly status = el("div", { class: "status muted" });
  private readonly notices = el("div", { class: "notices" });

  constructor(private readonly root: HTMLElement) {}

  async start(): Promise<void> {
    const filter = el("input", { class: "filter", type: "search", placeholder: "Filter runs (substring)" });
    filter.addEventListener("input", () => { this.filter = filter.value.toLowerCase(); this.renderRuns(); this.renderFindingList(); });
    const severity = el("select", { class: "severity-filter", title: "Minimum severity" });
    for (const s of SEVERITIES) {
      const option = el("option", {}, [s === "info" ? "all severities" : `${s}${s === "critical" ? "" : " and worse"}`]);
      option.value = s;
      severity.appendChild(option);
    }
    severity.value = "info";
    severity.addEventListener("change", () => { this.minSeverity = severity.value; this.renderFindingList(); });
    const refresh = el("button", { type: "button", class: "refresh" }, ["Reload"]);
    refresh.addEventListener("click", () => void this.reload());
    this.root.appendChild(el("div", { class: "layout" }, [
      el("aside", { class: "sidebar" }, [el("h2", {}, ["Runs"]), filter, this.runList]),
      el("main", { class: "content" }, [
        el("div", { class: "toolbar" }, [el("h2", {}, ["Findings"]), severity, refresh, this.status]),
        this.notices,
        el("div", { class: "columns" }, [this.findingList, this.viewHolder]),
      ]),
    ]));
    await this.reload();
  }

  /** What the reader skipped and what the server cut, as inert text. */
  private renderNotices(): void {
    clear(this.notices);
    const lines: string[] = [];
    if (this.report.truncated) {
      lines.push(`Showing ${this.report.runs.length} of ${this.report.total_runs ?? "?"} runs (response capped).`);
    }
    for (const run of this.report.runs) {
      if (run.truncated) lines.push(`${run.run}: showing ${run.findings.length} of ${run.total_findings ?? "?"} findings.`);
      for (const warning of run.warnings) lines.push(`${run.run}: ${warning}`);
    }
    lines.push(...this.report.warnings);
    if (lines.length === 0) return;
    const list = el("ul", {}, lines.map((line) => el("li", {}, [line])));
    const details = el("details", { class: "reader-warnings" }, [
      el("summary", {}, [`${lines.length} reader warning${lines.length === 1 ? "" : "s"}: data that was skipped`]),
      list,
    ]);
    this.notices.appendChild(details);
  }

  private async reload(): Promise<void> {
    this.status.textContent = "loading…";
    try {
      const [runs, report] = await Promise.all([fetchRuns(), fetchReport()]);
      this.runs = runs.runs;
      this.report = report;
    } catch (error) {
      this.status.textContent = `Could not load data: ${String(error)}`;
      return;
    }
    const known = new Set(this.runs.map((r) => r.run));
    for (const run of [...this.selected]) if (!known.has(run)) this.selected.delete(run);
    if (this.selected.size === 0) {
      const ranked = this.runs.slice().sort((a, b) => severityRank(a.worst_severity ?? "none") - severityRank(b.worst_severity ?? "none"));
      for (const r of ranked.slice(0, DEFAULT_VISIBLE_RUNS)) this.selected.add(r.run);
    }
    const total = this.allFindings().length;
    const warnings = this.report.warnings.length ? `, ${this.report.warnings.length} reader warnings` : "";
    this.status.textContent = `${this.runs.length} runs, ${total} findings${warnings}`;
    this.renderNotices();
    this.root.dataset.ready = "true";
    this.renderRuns();
    this.renderFindingList();
    for (const view of this.views.values()) view.destroy();
    this.views.clear();
    await this.syncViews();
  }

  private allFindings(): Finding[] {
    return this.report.runs.flatMap((r) => r.findings);
  }

  private visibleRuns(): RunSummary[] {
    return this.runs.filter((r) => r.run.toLowerCase().includes(this.filter));
  }

  private renderRuns(): void {
    clear(this.runList);
    for (const run of this.visibleRuns()) {
      const box = el("input", { type: "checkbox" });
      box.checked = this.selected.has(run.run);
      box.addEventListener("change", () => {
        if (box.checked) this.selected.add(run.run); else this.selected.delete(run.run);
        this.renderFindingList();
        void this.syncViews();
      });
      const counts = SEVERITIES.filter((s) => run.counts[s]).map((s) => `${run.counts[s]} ${s}`).join(", ");
      const unchecked = run.checked === false;
      const mark = unchecked
        ? el("span", { class: "badge badge-unchecked", data: { severity: "unchecked" } }, ["no data"])
        : badge(run.worst_severity);
      const note = unchecked ? "nothing to check" : run.instrumented ? "no findings" : "not instrumented";
      this.runList.appendChild(el("li", { class: "run-item", data: { run: run.run, severity: run.worst_severity ?? (unchecked ? "unchecked" : "healthy") } }, [
        el("label", {}, [box, " ", mark, " ", el("span", { class: "run-name" }, [run.run])]),
        el("div", { class: "muted counts" }, [counts || note]),
      ]));
    }
    if (!this.runList.firstChild) this.runList.appendChild(el("li", { class: "muted" }, ["No run matches the filter."]));
  }

  private renderFindingList(): void {
    const limit = severityRank(this.minSeverity);
    const visible = new Set(this.visibleRuns().map((r) => r.run));
    const findings = this.allFindings().filter((f) =>
      visible.has(f.run) && this.selected.has(f.run) && severityRank(f.severity) <= limit);
    renderFindings(this.findingList, sortFindings(findings), this.selectedFinding, (f) => void this.select(f));
  }

  private async syncViews(): Promise<void> {
    for (const [run, view] of this.views) {
      if (!this.selected.has(run)) { view.destroy(); this.views.delete(run); }
    }
    const pending: Promise<void>[] = [];
    for (const summary of this.runs) {
      if (!this.selected.has(summary.run) || this.views.has(summary.run)) continue;
      const findings = this.report.runs.find((r) => r.run === summary.run)?.findings ?? [];
      const view = new RunView(this.viewHolder, summary, findings);
      this.views.set(summary.run, view);
      pending.push(view.load().catch((error) => {
        view.root.appendChild(el("p", { class: "error" }, [`Could not load charts: ${String(error)}`]));
      }));
    }
    // Keep the side-by-side order equal to the run list order.
    for (const summary of this.runs) {
      const view = this.views.get(summary.run);
      if (view) this.viewHolder.appendChild(view.root);
    }
    await Promise.all(pending);
  }

  private async select(finding: Finding): Promise<void> {
    this.selectedFinding = findingKey(finding);
    this.root.dataset.selectedFinding = `${finding.kind}@${finding.run}`;
    if (!this.selected.has(finding.run)) {
      this.selected.add(finding.run);
      this.renderRuns();
      await this.syncViews();
    }
    this.renderFindingList();
    this.views.get(finding.run)?.focus(finding);
    this.views.get(finding.run)?.root.scrollIntoView({ block: "nearest" });
  }

  rerender(): void {
    for (const view of this.views.values()) view.destroy();
    this.views.clear();
    void this.syncViews();
  }
}

function loadStyles(): void {
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = new URL("./style.css", import.meta.url).toString();
  document.head.appendChild(link);
}

/** Called by TensorBoard's plugin entry page. */
export async function render(): Promise<void> {
  loadStyles();
  const root = el("div", { class: "tb-stability" });
  document.body.appendChild(root);
  const app = new App(root);
  watchTheme(() => app.rerender());
  await app.start();
}
