// The episode list of one run: what happened, where, which layers, what to do. Clicking an episode zooms every
// chart to it; clicking a layer opens its drill-down.

import { getJson } from "./api.js";
import { h, formatStep, formatValue, message } from "./dom.js";
import { metricLabel } from "./metrics.js";
import { causeLabel, seriesLabel } from "./validation.js";
import { relativeStep } from "./wording.js";

const KIND_LABEL = {
  explosion: "Explosion",
  nonfinite: "Non-finite gradients",
  overflow_skip: "Overflow skips",
  chronic: "Chronic instability",
  dead: "Dead layers",
  growth: "Slow growth",
  val_degradation: "Validation degradation",
};

/** A growth finding is slow growth or a saturated clip: the badge says which. */
function kindLabel(ep) {
  if (ep.growth && ep.growth.signal === "saturated_clip") return "Saturated clip";
  return KIND_LABEL[ep.kind] || ep.kind;
}

/** A peak-over-baseline ratio; null stands for infinity (a non-finite value). */
function ratioText(ratio) {
  return ratio === null || ratio === undefined ? "∞" : formatValue(ratio);
}

/** How many layers died, and how: at exactly zero, or vanished far below their baseline. */
function deadHead(d) {
  const how = !d.vanished ? "at zero" : d.vanished === d.layers ? "vanished"
    : `dead (${d.layers - d.vanished} at zero, ${d.vanished} vanished)`;
  return `${d.layers} of ${d.of} layers ${how}`;
}

/** Head line of an episode: its kind and steps. Validation findings say what they are about instead of a peak. */
function episodeHead(ep, i) {
  const v = ep.validation;
  if (!v) {
    return [
      h("span", { class: "badge", text: `#${i + 1} ${kindLabel(ep)}` }),
      h("span", { class: "ep-steps", text: ep.start_step === ep.end_step
        ? `step ${formatStep(ep.start_step)}`
        : `steps ${formatStep(ep.start_step)}–${formatStep(ep.end_step)}, peak ${formatStep(ep.peak_step)}` }),
      ep.growth
        ? h("span", { class: "ep-severity", text: ep.growth.signal === "saturated_clip"
          ? `clip binds on ${Math.round(100 * ep.growth.binding_share)} % of steps`
          : `×${formatValue(ep.growth.factor)} over the run` })
        : ep.dead
        ? h("span", { class: "ep-severity", text: deadHead(ep.dead) })
        : h("span", { class: "ep-severity", title: "severity", text: `severity ${ep.severity === null ? "∞ (non-finite)" : formatValue(ep.severity)}` }),
    ];
  }
  const what = seriesLabel(v.series);
  if (ep.kind === "nonfinite") {
    const steps = v.nonfinite_steps || [ep.start_step];
    return [
      h("span", { class: "badge", text: `#${i + 1} Non-finite ${what}` }),
      h("span", { class: "ep-steps", text: steps.length > 1
        ? `${steps.length} evaluations in a row, steps ${formatStep(steps[0])}–${formatStep(steps[steps.length - 1])}`
        : `evaluation at step ${formatStep(steps[0])}` }),
    ];
  }
  const worse = v.change === null ? "" : `${Math.abs((v.change - 1) * 100).toFixed(0)}% worse`;
  return [
    h("span", { class: "badge", text: `#${i + 1} ${KIND_LABEL[ep.kind]}` }),
    h("span", { class: `cause cause-${v.cause}`, text: causeLabel(v.cause) }),
    h("span", { class: "ep-steps", text: `${what}, steps ${formatStep(ep.start_step)}–${formatStep(ep.end_step)}` }),
    worse ? h("span", { class: "ep-severity", title: "recent value against the best", text: worse }) : null,
  ];
}

/** What a validation finding says in numbers: the best step (where to stop), the worst, and a related episode. */
function validationFacts(v) {
  if (v.best_step === null) {
    return h("div", { class: "ep-val", text: "No finite evaluation before it: there is no best step to go back to." });
  }
  return h("div", { class: "ep-val" },
    h("span", { class: "best-step", dataset: { step: String(v.best_step) },
      text: `${v.cause === "nonfinite" ? "Last good" : "Best"} ${seriesLabel(v.series)} ${formatValue(v.best_value)} `
        + `at step ${formatStep(v.best_step)}` }),
    v.cause !== "nonfinite" ? ` — the early-stopping point; worst ${formatValue(v.worst_value)} at step `
      + `${formatStep(v.worst_step)}` : null,
    v.related_step !== null && v.related_step !== undefined
      ? `; began with the instability at step ${formatStep(v.related_step)}` : null);
}

/** Batches listed in a card at first (those closest to the peak), batches each "show earlier" adds, and ids shown
 * per batch before "+N more". */
const SHOWN_BATCHES = 4;
const MORE_BATCHES = 50;
const SHOWN_IDS = 16;

function batchItem(ep, b) {
  const parts = b.epoch !== undefined ? [`epoch ${b.epoch}, batch ${b.batch}`] : [];
  if (b.ids.length) {
    const more = b.ids.length > SHOWN_IDS ? `, … (+${b.ids.length - SHOWN_IDS} more)` : "";
    parts.push(`sample ids ${b.ids.slice(0, SHOWN_IDS).join(", ")}${more}`);
  }
  return h("li", { class: b.step === ep.peak_step ? "batch peak" : "batch", dataset: { step: String(b.step) },
    text: `step ${formatStep(b.step)} (${relativeStep(b.step - ep.peak_step)}): ${parts.join("; ")}` });
}

/** The logged batches from the episode's start to its peak, the peak's last: step, sample ids and (Keras) epoch and
 * batch index, as text. The card lists the last few; "show earlier" adds more, first from those the episodes route
 * sent, then a page at a time from the batches route (an episode can span thousands of steps). */
function batchList(ep, run) {
  const total = ep.batches_total ?? ep.batches.length;
  let earliest = Math.max(0, ep.batches.length - SHOWN_BATCHES);  // index in ep.batches of the first listed
  let listed = ep.batches.length - earliest;
  const list = h("ul", {}, ep.batches.slice(earliest).map((b) => batchItem(ep, b)));
  const more = h("button", { class: "ep-more batches-more", type: "button" });
  const label = () => {
    const hidden = total - listed;
    more.hidden = hidden <= 0;
    more.disabled = false;
    more.textContent = `+${hidden} earlier ${hidden === 1 ? "batch" : "batches"}: show `
      + `${Math.min(hidden, MORE_BATCHES)} more`;
  };
  more.onclick = async (e) => {
    e.stopPropagation();
    more.disabled = true;
    let added = ep.batches.slice(Math.max(0, earliest - MORE_BATCHES), earliest);
    earliest -= added.length;
    if (!added.length) {
      const first = Number(list.firstElementChild.dataset.step);
      try {
        const page = await getJson("batches", { run, start: ep.start_step, end: first - 1, limit: MORE_BATCHES });
        added = page.batches;
      } catch (err) {
        more.textContent = `Could not load earlier batches: ${err.message}`;
        more.disabled = false;
        return;
      }
    }
    list.prepend(...added.map((b) => batchItem(ep, b)));
    listed += added.length;
    if (!added.length) listed = total;  // nothing older was recorded after all
    label();
  };
  label();
  return h("div", { class: "ep-batches" },
    h("span", { class: "ep-label", text: total > 1 ? "Batches:" : "Batch:" }), list, more);
}

export function renderEpisodes(report, { run, onEpisode, onLayer }) {
  const { episodes, warnings } = report;
  const list = h("ol", { class: "episode-list" });
  // AMP overflow skips are the loss scaler doing its job: one line below, not episode cards.
  const shown = episodes.filter((ep) => ep.kind !== "overflow_skip");
  episodes.forEach((ep, i) => {
    if (ep.kind === "overflow_skip") return;
    const top = ep.layers || [];
    const item = h(
      "li",
      {
        class: `episode kind-${ep.kind}${ep.validation ? " validation" : ""}`,
        tabindex: "0",
        role: "button",
        title: "Zoom every chart to this episode",
        dataset: { index: String(i), start: String(ep.start_step), end: String(ep.end_step), kind: ep.kind,
          cause: ep.validation ? String(ep.validation.cause) : undefined,
          bestStep: ep.validation && ep.validation.best_step !== null ? String(ep.validation.best_step) : undefined },
        onclick: () => onEpisode(ep),
        onkeydown: (e) => {
          if (e.key === "Enter" || e.key === " ") {
            e.preventDefault();
            onEpisode(ep);
          }
        },
      },
      h("div", { class: "ep-head" }, episodeHead(ep, i)),
      ep.validation ? validationFacts(ep.validation) : null,
      ep.growth ? h("p", { class: "growth-summary", dataset: { signal: ep.growth.signal },
        text: `${ep.growth.summary[0].toUpperCase()}${ep.growth.summary.slice(1)}. A warning: nothing broke yet.` })
        : null,
      top.length
        ? h("div", { class: "ep-layers" },
          h("span", { class: "ep-label", text: ep.dead ? "Dead layers:"
            : ep.growth ? (ep.growth.signal === "saturated_clip" ? "Clipped series:" : "Grown series:")
            : top.every((f) => f.metric === "total_grad_norm") ? "Run-level series:"
              : top.length > 1 ? "Offending layers:" : "Offending layer:" }),
          top.slice(0, 3).map((f, j) => h("button", {
            class: `layer-chip${j === 0 ? " top" : ""}`,
            type: "button",
            title: ep.dead
              ? `${f.name}: ${metricLabel(f.metric)} ${f.ratio ? `×${ratioText(f.ratio)} its baseline` : "exactly zero"} `
                + `from step ${formatStep(f.first_step)} to step ${formatStep(f.peak_step)}`
              : `${f.name}: ${metricLabel(f.metric)} peaked at ${formatValue(f.peak_value)} (×${ratioText(f.ratio)} its `
                + `baseline) at step ${formatStep(f.peak_step)}, first over threshold at step ${formatStep(f.first_step)}`,
            dataset: { layer: f.name },
            onclick: (e) => {
              e.stopPropagation();
              onLayer(f.name, ep);
            },
          }, h("span", { class: "name", text: f.metric === "total_grad_norm" ? metricLabel(f.metric) : f.name }),
          h("span", { class: "ratio", text: ep.dead
            ? ` ${f.ratio ? "vanished" : "zero"} from ${formatStep(f.first_step)}` : ` ×${ratioText(f.ratio)}` }))),
          top.length > 3 ? h("span", { class: "ep-more", text: `+${top.length - 3} more` }) : null)
        : null,
      ep.loss_spike_step !== null && ep.loss_spike_step !== undefined
        ? h("div", { class: "ep-loss", text: `Loss spiked at step ${formatStep(ep.loss_spike_step)} (`
          + `${relativeStep(ep.loss_spike_step - ep.peak_step)})` })
        : null,
      ep.batches && ep.batches.length ? batchList(ep, run ?? report.run) : null,
      ep.advice && ep.advice.length
        ? h("ul", { class: "ep-advice" }, ep.advice.map((a) => h("li", { text: a })))
        : null,
    );
    list.append(item);
  });
  const spikes = report.spikes || { count: 0 };
  const amp = report.amp;
  return h("div", { class: "episodes" },
    h("div", { class: "block-title", text: `Episodes (${shown.length})` }),
    amp && (amp.skipped || amp.collapsed)
      ? h("p", { class: "amp-summary", text: `${amp.summary}.`, dataset: { skipped: String(amp.skipped) } })
      : null,
    spikes.count
      ? h("p", { class: "transient-summary", text: `${spikes.summary}: not episodes (nothing broke); marked on the loss chart.`,
        dataset: { count: String(spikes.count) } })
      : null,
    shown.length
      ? list
      : message("empty", "No explosion or non-finite episode detected.",
        `Checked ${formatStep(report.steps)} logged steps. Spikes in the loss alone are still marked on the loss chart.`,
        ...(report.validation || []).filter((v) => v.best_step !== null).map((v) => `${seriesLabel(v.series)} `
          + `has not worsened: best ${formatValue(v.best_value)} at step ${formatStep(v.best_step)}.`)),
    (warnings || []).length
      ? h("ul", { class: "warnings" }, warnings.map((w) => h("li", { text: w })))
      : null);
}
