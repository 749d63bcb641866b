// A run's card. Everything drawn comes from the model's traits (title, run,
// messages, output, notice, clock); a Cancel or Retry click goes back as a
// message, {action, task_id}. The pieces are exported for the board.

/** document.createElement with properties and children (null/false skipped). */
export function h(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.flat().filter((c) => c != null && c !== false));
  return node;
}

export function seconds(s) {
  if (s < 60) return `${s.toFixed(1)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

/** Seconds since the epoch on the kernel's clock, given how far the browser's runs ahead. */
const kernelNow = (lead) => Date.now() / 1000 - lead;

/** A run's elapsed time; ticks (see tickClocks) while it has started and not ended. */
export function elapsed(run, lead) {
  const node = h("span", { className: "cnb-elapsed" });
  if (run.started_at && !run.completed_at) node.dataset.since = run.started_at;
  const end = run.completed_at ?? kernelNow(lead);
  node.textContent = run.started_at ? seconds(Math.max(0, end - run.started_at)) : "not started";
  return node;
}

/** Advance every running clock under root once a second (`lead` is a getter); returns the cleanup. */
export function tickClocks(root, lead) {
  const timer = setInterval(() => {
    const now = kernelNow(lead());
    for (const node of root.querySelectorAll(".cnb-elapsed[data-since]")) {
      node.textContent = seconds(Math.max(0, now - Number(node.dataset.since)));
    }
  }, 1000);
  return () => clearInterval(timer);
}

/**
 * Follow the kernel's clock: `clock` is the kernel's time when the state was
 * sent, so the browser's lead over it is measured as each update arrives.
 * Returns a getter of that lead and the cleanup.
 */
export function kernelClock(model) {
  let lead = Date.now() / 1000 - model.get("clock");
  const measure = () => (lead = Date.now() / 1000 - model.get("clock"));
  model.on("change:clock", measure);
  return [() => lead, () => model.off("change:clock", measure)];
}

export const badge = (status) => h("span", { className: `cnb-badge cnb-${status}`, textContent: status });

export function progressBar(fraction, status) {
  const bar = h("div", { className: `cnb-progress cnb-${status}`, role: "progressbar" });
  const fill = h("div", { className: "cnb-progress-fill" });
  fill.style.width = `${Math.round(fraction * 100)}%`;
  bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
  bar.append(fill);
  return bar;
}

/** Cancel while unfinished, Retry when finished without success. */
export function actions(run, act) {
  const button = (label, action) =>
    h("button", {
      className: `cnb-button cnb-${action}`,
      textContent: label,
      onclick: (event) => {
        event.stopPropagation();
        event.currentTarget.disabled = true; // until the new state arrives
        act(action, run.task_id);
      },
    });
  return h("span", { className: "cnb-actions" },
    run.can_cancel && button("Cancel", "cancel"),
    run.can_retry && button("Retry", "retry"));
}

function message(m) {
  const text = m.kind === "show_task" ? `showed run ${m.text}` : m.text;
  return h("li", { className: `cnb-message cnb-${m.kind}` },
    h("span", { className: "cnb-kind", textContent: m.kind === "show_task" ? "card" : m.kind }),
    h("span", { className: "cnb-text", textContent: text }),
    m.detail && h("span", { className: "cnb-message-detail", textContent: m.detail }));
}

/**
 * The card itself, from {title, run, messages, output}. `ui` keeps what the
 * reader opened (the traceback) across redraws; `act(action, task_id)` sends a click.
 */
export function renderCard({ title, run, messages = [], output = [] }, { lead, ui, act }) {
  const p = run.progress;
  const startsAt = ["scheduled", "retry"].includes(run.status) && run.scheduled_for;
  const fraction = p && p.total ? Math.min(1, Math.max(0, p.done / p.total)) : null;
  const attempts = `attempt ${run.attempt} of ${run.max_attempts}`;
  const trace = run.traceback && h("details", {
    className: "cnb-traceback",
    open: ui.traceback ?? false,
    ontoggle: (event) => (ui.traceback = event.currentTarget.open),
  }, h("summary", { textContent: "Traceback" }), h("pre", { textContent: run.traceback }));

  return h("div", { className: `cnb-card cnb-is-${run.status}` },
    h("div", { className: "cnb-head" },
      h("span", { className: "cnb-title", textContent: title }),
      badge(run.status),
      h("span", { className: "cnb-meta", textContent: attempts }),
      startsAt && h("span", { className: "cnb-meta",
        textContent: `starts ${new Date(startsAt * 1000).toLocaleTimeString()}` }),
      elapsed(run, lead),
      actions(run, act)),
    h("div", { className: "cnb-sub", textContent: `${run.task_name} · ${run.task_id}` }),
    p && h("div", { className: "cnb-progress-row" },
      fraction != null && progressBar(fraction, run.status),
      h("span", { className: "cnb-meta",
        textContent: [p.total ? `${p.done}/${p.total}` : `${p.done}`, p.message].filter(Boolean).join(" · ") })),
    messages.length > 0 && h("ul", { className: "cnb-messages" }, messages.map(message)),
    output.length > 0 && h("pre", { className: "cnb-output" },
      output.map((o) => h("span", { className: `cnb-stream-${o.stream}`, textContent: o.text }))),
    run.error && h("div", { className: "cnb-error", textContent: run.error }),
    trace,
    run.result_repr != null && h("div", { className: "cnb-result" },
      h("span", { className: "cnb-label", textContent: "result " }),
      h("code", { textContent: run.result_repr })),
    run.result_note && h("div", { className: "cnb-meta", textContent: run.result_note }));
}

/** What the last Cancel or Retry said when it could not act (empty: hidden). */
export const notice = (text) => h("div", { className: "cnb-notice", textContent: text ?? "" });

export default {
  render({ model, el }) {
    el.classList.add("cnb");
    const ui = {};
    const [lead, stopClock] = kernelClock(model);
    const act = (action, task_id) => model.send({ action, task_id });
    const draw = () => {
      const run = model.get("run");
      if (!run.task_id) return;
      const card = { title: model.get("title"), run, messages: model.get("messages"), output: model.get("output") };
      const scroller = el.querySelector(".cnb-output");
      const atBottom = !scroller || scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - 4;
      el.replaceChildren(renderCard(card, { lead: lead(), ui, act }), notice(model.get("notice")));
      const fresh = el.querySelector(".cnb-output");
      if (fresh && atBottom) fresh.scrollTop = fresh.scrollHeight; // follow the output like a terminal
    };
    draw();
    model.on("change", draw);
    const stopTicking = tickClocks(el, lead);
    return () => {
      model.off("change", draw);
      stopClock();
      stopTicking();
    };
  },
};
