// The run overview: every run of the logdir in one sortable table, so a sweep of hundreds of runs can be scanned at
// a glance. It reads only the runs route (no run's episode list); picking a row opens that run in the run view.

import { formatStep, formatValue, h } from "./dom.js";

/** Episode kinds in the order the table lists them (the worst first): [kind, one, many, what it is]. */
const KINDS = [
  ["nonfinite", "non-finite", "non-finite", "NaN/Inf gradients, loss or evaluations"],
  ["explosion", "explosion", "explosions", "gradient explosions that broke training"],
  ["chronic", "chronic", "chronic", "recurring spikes and explosions"],
  ["val_degradation", "validation", "validation", "validation worse than at its best step"],
  ["dead", "dead", "dead", "layers whose gradient went to zero and stayed there"],
  ["overflow_skip", "AMP skip", "AMP skips", "AMP overflow skips (normal, no finding)"],
];

/** Episodes that are findings: AMP overflow skips are normal, as in the run picker's warning count. */
export function findingCount(run) {
  return run.episodes - ((run.episode_kinds || {}).overflow_skip || 0);
}

/** Sort value of the worst severity: a non-finite episode is worse than any ratio. */
function severityKey(run) {
  return run.worst_severity_nonfinite ? Infinity : run.worst_severity;
}

/**
 * The table's columns: `value` is what the column sorts on (null/undefined sorts last in either direction),
 * `first` the direction of the first click (the worst, largest or latest first, except names and the first episode).
 */
const COLUMNS = [
  { key: "run", label: "Run", value: (r) => r.run, first: "asc", cell: (r) => h("span", { class: "ov-name", title: r.run, text: r.run }) },
  { key: "episodes", label: "Episodes", value: findingCount, first: "desc", cell: kindsCell },
  { key: "first_episode_step", label: "First episode", value: (r) => r.first_episode_step, first: "asc", numeric: true,
    cell: (r) => (r.first_episode_step === null || r.first_episode_step === undefined ? "—" : `step ${formatStep(r.first_episode_step)}`) },
  { key: "worst_severity", label: "Worst severity", value: severityKey, first: "desc", numeric: true, cell: severityCell },
  { key: "source", label: "Source", value: (r) => r.source, first: "asc", cell: (r) => r.source },
  { key: "steps", label: "Steps", value: (r) => r.steps, first: "desc", numeric: true, cell: (r) => formatStep(r.steps) },
  { key: "last_wall_time", label: "Last update", value: (r) => r.last_wall_time, first: "desc", numeric: true,
    cell: updatedCell },
];

function kindsCell(run) {
  const kinds = run.episode_kinds || {};
  const chips = KINDS.filter(([kind]) => kinds[kind]).map(([kind, one, many, what]) => h("span",
    { class: `ov-kind kind-${kind}`, dataset: { kind }, title: what,
      text: `${kinds[kind]} ${kinds[kind] === 1 ? one : many}` }));
  return chips.length ? chips : h("span", { class: "ov-none", text: "none" });
}

function severityCell(run) {
  if (run.worst_severity_nonfinite) return h("span", { class: "ov-severe", text: "∞ non-finite" });
  if (run.worst_severity === null || run.worst_severity === undefined) return "—";
  return `${formatValue(run.worst_severity)}× baseline`;
}

function updatedCell(run) {
  const t = run.last_wall_time;
  if (typeof t !== "number") return "—";
  const date = new Date(t * 1000);
  return h("span", { title: date.toLocaleString(), text: ago(Date.now() / 1000 - t, date) });
}

/** "5 min ago", "3 h ago", "12 d ago"; a date beyond two months (and for clocks that disagree). */
function ago(seconds, date) {
  if (seconds < 0 || seconds > 60 * 86400) return date.toLocaleDateString();
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

function compare(a, b) {
  if (typeof a === "string" || typeof b === "string") return String(a).localeCompare(String(b));
  return a === b ? 0 : a < b ? -1 : 1;
}

export class RunOverview {
  /** `onOpen(run)` is called with the name of the run picked in the table. */
  constructor({ onOpen }) {
    this.onOpen = onOpen;
    this.runs = [];
    this.current = null;
    this.sort = { key: "worst_severity", dir: "desc" };
    this.filterInput = h("input", { id: "overview-filter", type: "search", placeholder: "Filter runs by name",
      "aria-label": "Filter runs by name", autocomplete: "off", oninput: () => this.render() });
    this.findingsFirst = h("input", { id: "overview-findings-first", type: "checkbox", checked: true,
      onchange: () => this.render() });
    this.count = h("span", { class: "ov-count", role: "status" });
    this.headRow = h("tr", {});
    this.body = h("tbody", {});
    this.table = h("table", { class: "ov-table" }, h("thead", {}, this.headRow), this.body);
    this.el = h("section", { class: "overview block", hidden: true, "aria-label": "All runs" },
      h("div", { class: "block-head" },
        h("span", { class: "block-title", text: "All runs" }),
        this.filterInput,
        h("label", { class: "toggle" }, this.findingsFirst, h("span", { text: "Runs with findings first" })),
        this.count),
      h("div", { class: "ov-scroll" }, this.table));
  }

  get shown() {
    return !this.el.hidden;
  }

  show(flag) {
    this.el.hidden = !flag;
  }

  /** New answer of the runs route; `current` is the run open in the run view (marked in the table). */
  update(runs, current) {
    this.runs = runs;
    this.current = current;
    this.render();
  }

  setSort(key) {
    const column = COLUMNS.find((c) => c.key === key);
    const flip = { asc: "desc", desc: "asc" };
    this.sort = { key, dir: this.sort.key === key ? flip[this.sort.dir] : column.first };
    this.render();
  }

  /** The runs the filter lets through, in table order: findings first (if chosen), then the sorted column, then name. */
  ordered() {
    const terms = this.filterInput.value.toLowerCase().split(/\s+/).filter(Boolean);
    const shown = this.runs.filter((r) => terms.every((t) => r.run.toLowerCase().includes(t)));
    const column = COLUMNS.find((c) => c.key === this.sort.key);
    const sign = this.sort.dir === "asc" ? 1 : -1;
    const grouped = this.findingsFirst.checked;
    return shown.sort((a, b) => {
      if (grouped) {
        const g = Number(findingCount(b) > 0) - Number(findingCount(a) > 0);
        if (g) return g;
      }
      const [va, vb] = [column.value(a), column.value(b)];
      const [na, nb] = [va === null || va === undefined, vb === null || vb === undefined];
      if (na !== nb) return na ? 1 : -1;
      return (na ? 0 : sign * compare(va, vb)) || compare(a.run, b.run);
    });
  }

  render() {
    this.headRow.replaceChildren(...COLUMNS.map((c) => {
      const active = c.key === this.sort.key;
      const arrow = active ? (this.sort.dir === "asc" ? " ▲" : " ▼") : "";
      return h("th", { class: c.numeric ? "num" : null, "aria-sort": active ? `${this.sort.dir}ending` : "none",
        dataset: { key: c.key } },
      h("button", { type: "button", class: "ov-sort", text: `${c.label}${arrow}`, onclick: () => this.setSort(c.key) }));
    }));
    const rows = this.ordered();
    this.table.dataset.sort = `${this.sort.key} ${this.sort.dir}`;
    this.body.replaceChildren(...rows.map((r) => this.row(r)));
    if (!rows.length) {
      this.body.append(h("tr", {}, h("td", { class: "ov-empty", colspan: COLUMNS.length,
        text: this.runs.length ? "No run name matches the filter." : "No runs yet." })));
    }
    const flagged = this.runs.filter((r) => findingCount(r) > 0).length;
    const total = this.runs.length;
    this.count.textContent = `${rows.length === total ? "" : `${rows.length} of `}${total} run${total === 1 ? "" : "s"}`
      + ` · ${flagged} with findings`;
  }

  row(run) {
    const open = () => this.onOpen(run.run);
    return h("tr", {
      class: `ov-row${findingCount(run) > 0 ? " has-findings" : ""}${run.run === this.current ? " current" : ""}`,
      tabindex: 0, title: `Open ${run.run}`, dataset: { run: run.run },
      onclick: open,
      onkeydown: (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          open();
        }
      },
    }, COLUMNS.map((c) => h("td", { class: c.numeric ? "num" : null, dataset: { key: c.key } }, c.cell(run))));
  }
}
