/** The findings list: sorted by severity, with evidence, explanation and remedy. */

import { clear, el, fmt } from "./dom";
import type { Finding } from "./types";
import { severityRank } from "./types";

export function findingKey(f: Finding): string {
  return `${f.run}\u0000${f.kind}\u0000${f.first_step}\u0000${f.last_step}\u0000${f.layers.join(",")}`;
}

export function sortFindings(findings: Finding[]): Finding[] {
  return findings.slice().sort((a, b) =>
    severityRank(a.severity) - severityRank(b.severity) ||
    (a.first_step ?? -1) - (b.first_step ?? -1) ||
    a.kind.localeCompare(b.kind) || a.run.localeCompare(b.run));
}

export function badge(severity: string | null): HTMLElement {
  const label = severity ?? "healthy";
  return el("span", { class: `badge badge-${label}`, data: { severity: label } }, [label]);
}

function stepsText(f: Finding): string {
  if (f.first_step === null) return "";
  if (f.last_step === null || f.last_step === f.first_step) return `step ${f.first_step}`;
  return `steps ${f.first_step}–${f.last_step}`;
}

async function copyText(text: string, button: HTMLButtonElement, source: HTMLElement): Promise<void> {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch {
    ok = false;
  }
  if (!ok) {
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection?.removeAllRanges();
    selection?.addRange(range);
    try { ok = document.execCommand("copy"); } catch { ok = false; }
  }
  button.textContent = ok ? "Copied" : "Selected: press Ctrl+C";
  window.setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function evidenceTable(evidence: Record<string, unknown>): HTMLElement {
  const table = el("table", { class: "evidence" });
  for (const [key, value] of Object.entries(evidence)) {
    table.appendChild(el("tr", {}, [el("th", {}, [key]), el("td", {}, [fmt(value)])]));
  }
  return table;
}

export function findingCard(f: Finding, selected: boolean, onSelect: (f: Finding) => void): HTMLElement {
  const code = el("code", {}, [f.remedy]);
  const pre = el("pre", { class: "remedy" }, [code]);
  const copy = el("button", { class: "copy", type: "button", title: "Copy the remedy" }, ["Copy"]);
  copy.addEventListener("click", (event) => {
    event.stopPropagation();
    void copyText(f.remedy, copy, code);
  });
  const layers = f.layers.length
    ? el("div", { class: "layers" }, [
        "layers: ",
        ...f.layers.slice(0, 12).flatMap((name, i) => [i ? ", " : "", el("span", { class: "layer" }, [name])]),
        f.layers.length > 12 ? ` (+${f.layers.length - 12} more)` : "",
      ])
    : null;
  const card = el("article", {
    class: `finding${selected ? " selected" : ""}`,
    data: { kind: f.kind, severity: f.severity, run: f.run },
    title: "Show this finding on the charts",
  }, [
    el("header", {}, [
      badge(f.severity), " ",
      el("span", { class: "kind" }, [f.kind]), " ",
      el("span", { class: "run-name" }, [f.run]), " ",
      el("span", { class: "muted" }, [stepsText(f)]),
    ]),
    el("p", { class: "explanation" }, [f.explanation]),
    layers,
    Object.keys(f.evidence).length ? evidenceTable(f.evidence) : null,
    f.remedy ? el("div", { class: "remedy-box" }, [el("div", { class: "remedy-head muted" }, ["Remedy ", copy]), pre]) : null,
  ]);
  card.tabIndex = 0;
  card.addEventListener("click", () => onSelect(f));
  card.addEventListener("keydown", (event) => {
    if ((event as KeyboardEvent).key === "Enter") onSelect(f);
  });
  return card;
}

/** Renders findings (already filtered) into `list`. */
export function renderFindings(
  list: HTMLElement, findings: Finding[], selectedKey: string | null, onSelect: (f: Finding) => void,
): void {
  clear(list);
  if (findings.length === 0) {
    list.appendChild(el("p", { class: "muted empty" }, ["No findings for the selected runs."]));
    return;
  }
  for (const f of sortFindings(findings)) {
    list.appendChild(findingCard(f, findingKey(f) === selectedKey, onSelect));
  }
}
