// The last hour's charts, drawn with uPlot (vendor/uplot, loaded by index.html as the global `uPlot`):
// canvas, about 50 kB, fast on a Pi. The data is GET /v1/stats/history (see services/history.py): read
// whole once, then only its last minutes, merged here. Lines differ by dash as well as by colour.

const HEIGHT = 170;
const PALETTE = ["#2b6fd6", "#c7362f", "#1f8f4e", "#c77c00", "#7a4fd0", "#0f8b8d", "#b0487a", "#6b7385"];
const DASHED = [6, 4];

const fmtInt = new Intl.NumberFormat();

function line(label, index, { dash = false, unit = "" } = {}) {
  return {
    label,
    stroke: PALETTE[index % PALETTE.length],
    width: 2,
    dash: dash ? DASHED : undefined,
    spanGaps: false,
    // latencies exist only in minutes with completions: a lone one shows as a point, not as nothing
    points: unit === "s" ? { show: true, size: 5 } : { show: false },
    value: (_, v) => (v === null || v === undefined ? "–" : `${unit === "s" ? v.toFixed(2) : fmtInt.format(v)}${unit}`),
  };
}

const sum = (values) => values.reduce((total, v) => total + (v || 0), 0);
const max = (values) => values.reduce((top, v) => (v !== null && v > top ? v : top), 0);

// Each chart: its figure's id, its series from a history, and what its caption adds.
const SPECS = [
  {
    id: "chart-outcomes",
    series: (h) => [
      [line("completed", 2), h.completed],
      [line("failed", 1, { dash: true }), h.failed],
    ],
    summary: (h) => `${fmtInt.format(sum(h.completed))} completed, ${fmtInt.format(sum(h.failed))} failed`,
  },
  {
    id: "chart-depth",
    series: (h) => Object.entries(h.queue_depth).map(([provider, depth], i) => [line(provider, i, { dash: i % 2 === 1 }), depth]),
    summary: (h) => {
      const now = Object.values(h.queue_depth).reduce((total, d) => total + (d.at(-1) || 0), 0);
      return `${fmtInt.format(now)} queued now`;
    },
  },
  {
    id: "chart-rate-limited",
    series: (h) => [[line("429s", 3), h.rate_limited]],
    summary: (h) => `${fmtInt.format(sum(h.rate_limited))} in the hour`,
  },
  {
    id: "chart-e2e",
    series: (h) => [
      [line("p50", 0, { unit: "s" }), h.e2e_p50_s],
      [line("p95", 4, { dash: true, unit: "s" }), h.e2e_p95_s],
    ],
    summary: (h) => `p95 up to ${max(h.e2e_p95_s).toFixed(2)} s`,
  },
  {
    id: "chart-wait",
    series: (h) => [
      [line("p50", 0, { unit: "s" }), h.wait_p50_s],
      [line("p95", 4, { dash: true, unit: "s" }), h.wait_p95_s],
    ],
    summary: (h) => `p95 up to ${max(h.wait_p95_s).toFixed(2)} s`,
  },
];

// A new history with `update` (its last minutes) merged in: same minutes replaced, new ones added,
// the oldest dropped so that the span stays what the gateway serves.
export function merge(history, update) {
  if (!history) return update;
  const keep = history.start_ms.filter((t) => t < update.start_ms[0]).length;
  const span = history.start_ms.length;
  const cut = (old, fresh) => [...old.slice(0, keep), ...fresh].slice(-span);
  const merged = { ...update };
  for (const key of ["start_ms", "completed", "failed", "rate_limited", "e2e_p50_s", "e2e_p95_s", "wait_p50_s", "wait_p95_s"]) {
    merged[key] = cut(history[key], update[key]);
  }
  merged.queue_depth = {};
  const providers = new Set([...Object.keys(history.queue_depth), ...Object.keys(update.queue_depth)]);
  for (const provider of [...providers].sort()) {
    const old = history.queue_depth[provider] || history.start_ms.map(() => 0);
    const fresh = update.queue_depth[provider] || update.start_ms.map(() => 0);
    merged.queue_depth[provider] = cut(old, fresh);
  }
  return merged;
}

export class Charts {
  constructor() {
    this.plots = new Map(); // figure id -> { plot, labels }
  }

  show(history) {
    const x = history.start_ms.map((t) => t / 1000);
    for (const spec of SPECS) {
      const figure = document.getElementById(spec.id);
      const series = spec.series(history);
      const labels = series.map(([s]) => s.label).join("\n");
      const data = [x, ...series.map(([, values]) => values)];
      let known = this.plots.get(spec.id);
      if (known && known.labels !== labels) {
        known.plot.destroy(); // a provider came or went: its series with it
        known = undefined;
      }
      if (known) {
        known.plot.setData(data);
      } else {
        const options = {
          width: this.width(figure),
          height: HEIGHT,
          series: [{}, ...series.map(([s]) => s)],
          scales: { x: { time: true }, y: { range: (_, lo, hi) => [0, Math.max(1, hi * 1.1)] } },
          axes: [{ stroke: "currentColor" }, { stroke: "currentColor", size: 46 }],
          legend: { live: true },
          cursor: { drag: { x: false, y: false } },
        };
        this.plots.set(spec.id, { plot: new uPlot(options, data, figure), labels });
      }
      figure.dataset.points = String(x.length);
      const caption = figure.querySelector("figcaption");
      let summary = caption.querySelector(".summary");
      if (!summary) {
        summary = document.createElement("span");
        summary.className = "summary muted";
        caption.append(" · ", summary);
      }
      summary.textContent = spec.summary(history);
    }
  }

  width(figure) {
    return Math.max(240, figure.clientWidth || 320);
  }

  resize() {
    for (const [id, { plot }] of this.plots) plot.setSize({ width: this.width(document.getElementById(id)), height: HEIGHT });
  }
}
