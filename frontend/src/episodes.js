// The episode list of one run: what happened, where, which layers, what to do. Clicking an episode zooms every
// chart to it; clicking a layer opens its drill-down.

import { h, formatStep, formatValue, message } from "./dom.js";

const KIND_LABEL = {
  explosion: "Explosion",
  nonfinite: "Non-finite gradients",
  overflow_skip: "Overflow skips",
  val_degradation: "Validation degradation",
};

export function renderEpisodes(report, { onEpisode, onLayer }) {
  const { episodes, warnings } = report;
  const list = h("ol", { class: "episode-list" });
  episodes.forEach((ep, i) => {
    const top = ep.layers || [];
    const item = h(
      "li",
      {
        class: `episode kind-${ep.kind}`,
        tabindex: "0",
        role: "button",
        title: "Zoom every chart to this episode",
        dataset: { index: String(i), start: String(ep.start_step), end: String(ep.end_step), kind: ep.kind },
        onclick: () => onEpisode(ep),
        onkeydown: (e) => {
          if (e.key === "Enter" || e.key === " ") {
            e.preventDefault();
            onEpisode(ep);
          }
        },
      },
      h("div", { class: "ep-head" },
        h("span", { class: "badge", text: `#${i + 1} ${KIND_LABEL[ep.kind] || ep.kind}` }),
        h("span", { class: "ep-steps", text: ep.start_step === ep.end_step
          ? `step ${formatStep(ep.start_step)}`
          : `steps ${formatStep(ep.start_step)}–${formatStep(ep.end_step)}, peak ${formatStep(ep.peak_step)}` }),
        h("span", { class: "ep-severity", title: "severity", text: `severity ${formatValue(ep.severity)}` })),
      top.length
        ? h("div", { class: "ep-layers" },
          h("span", { class: "ep-label", text: top.length > 1 ? "Offending layers:" : "Offending layer:" }),
          top.slice(0, 3).map((f, j) => h("button", {
            class: `layer-chip${j === 0 ? " top" : ""}`,
            type: "button",
            title: `${f.name}: ${f.metric} peaked at ${formatValue(f.peak_value)} (×${formatValue(f.ratio)} its `
              + `baseline) at step ${formatStep(f.peak_step)}, first over threshold at step ${formatStep(f.first_step)}`,
            dataset: { layer: f.name },
            onclick: (e) => {
              e.stopPropagation();
              onLayer(f.name, ep);
            },
          }, h("span", { class: "name", text: f.name }), h("span", { class: "ratio", text: ` ×${formatValue(f.ratio)}` }))),
          top.length > 3 ? h("span", { class: "ep-more", text: `+${top.length - 3} more` }) : null)
        : null,
      ep.loss_spike_step !== null && ep.loss_spike_step !== undefined
        ? h("div", { class: "ep-loss", text: `Loss spiked at step ${formatStep(ep.loss_spike_step)} (`
          + `${ep.loss_spike_step >= ep.peak_step ? "+" : ""}${ep.loss_spike_step - ep.peak_step} steps after the peak)` })
        : null,
      ep.advice && ep.advice.length
        ? h("ul", { class: "ep-advice" }, ep.advice.map((a) => h("li", { text: a })))
        : null,
    );
    list.append(item);
  });
  return h("div", { class: "episodes" },
    h("div", { class: "block-title", text: `Episodes (${episodes.length})` }),
    episodes.length
      ? list
      : message("empty", "No explosion, non-finite or overflow episode detected.",
        `Checked ${formatStep(report.steps)} logged steps. Spikes in the loss alone are still marked on the loss chart.`),
    (warnings || []).length
      ? h("ul", { class: "warnings" }, warnings.map((w) => h("li", { text: w })))
      : null);
}
