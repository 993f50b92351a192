// Light/dark theme that follows TensorBoard: the parent document's `dark-mode` body class when the tab runs inside
// TensorBoard (same origin), otherwise the OS preference.

const LIGHT = {
  dark: false,
  text: "#212121",
  textMuted: "#616161",
  axis: "#9e9e9e",
  grid: "#e0e0e0",
  background: "#ffffff",
  panel: "#f5f5f5",
  absent: "#eeeeee",
  line: "#425066",
  secondLine: "#12b5cb",
  valLine: "#9334e6",
  valMetric: "#e52592",
  baseline: "#1e8e3e",
  threshold: "#d93025",
  envelope: "rgba(66, 80, 102, 0.18)",
  spike: "#d93025",
  accent: "#f57c00",
  selected: "#1a73e8",
  nonfinite: [255, 23, 68],
  episode: { explosion: "#f57c00", nonfinite: "#d50000", overflow_skip: "#8e24aa", val_degradation: "#9334e6",
    chronic: "#ef6c00", dead: "#546e7a", growth: "#b08800" },
  episodeAlpha: 0.16,
};

const DARK = {
  ...LIGHT,
  dark: true,
  text: "#e8eaed",
  textMuted: "#9aa0a6",
  axis: "#757575",
  grid: "#3c4043",
  background: "#202124",
  panel: "#2a2b2e",
  absent: "#303134",
  line: "#aecbfa",
  secondLine: "#78d9ec",
  valLine: "#d7aefb",
  valMetric: "#ff8bcb",
  baseline: "#81c995",
  threshold: "#f28b82",
  envelope: "rgba(174, 203, 250, 0.2)",
  spike: "#f28b82",
  accent: "#ff9800",
  selected: "#8ab4f8",
  episode: { explosion: "#ff9800", nonfinite: "#ff5252", overflow_skip: "#ce93d8", val_degradation: "#d7aefb",
    chronic: "#ffb74d", dead: "#90a4ae", growth: "#e0c050" },
  episodeAlpha: 0.22,
};

function parentBody() {
  try {
    if (window.parent && window.parent !== window && window.parent.document && window.parent.document.body) {
      return window.parent.document.body;
    }
  } catch {
    // A cross-origin parent: fall back to the OS preference.
  }
  return null;
}

export class Theme {
  constructor() {
    this.listeners = [];
    this.media = window.matchMedia("(prefers-color-scheme: dark)");
    this.body = parentBody();
    this.palette = this.compute();
    const update = () => {
      const next = this.compute();
      if (next.dark !== this.palette.dark) {
        this.palette = next;
        this.apply();
        for (const fn of this.listeners) fn(next);
      }
    };
    this.media.addEventListener("change", update);
    if (this.body) {
      new MutationObserver(update).observe(this.body, { attributes: true, attributeFilter: ["class"] });
    }
    this.apply();
  }

  compute() {
    const dark = this.body ? this.body.classList.contains("dark-mode") : this.media.matches;
    return dark ? DARK : LIGHT;
  }

  apply() {
    document.documentElement.classList.toggle("dark", this.palette.dark);
    document.documentElement.style.colorScheme = this.palette.dark ? "dark" : "light";
  }

  onChange(fn) {
    this.listeners.push(fn);
  }
}

/** Viridis, 256 entries of [r, g, b]: perceptually uniform and readable in both themes. */
export const VIRIDIS = buildViridis();

function buildViridis() {
  const stops = [
    [68, 1, 84], [72, 35, 116], [64, 67, 135], [52, 94, 141], [41, 120, 142], [32, 144, 140],
    [34, 167, 132], [68, 190, 112], [121, 209, 81], [189, 222, 38], [253, 231, 37],
  ];
  const lut = [];
  for (let i = 0; i < 256; i++) {
    const t = (i / 255) * (stops.length - 1);
    const k = Math.min(stops.length - 2, Math.floor(t));
    const f = t - k;
    lut.push(stops[k].map((c, j) => Math.round(c + (stops[k + 1][j] - c) * f)));
  }
  return lut;
}

export function rgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}
