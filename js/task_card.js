// A run's card. Everything drawn comes from the model's traits (title, run,
// messages, output, notice, clock, source); a Cancel or Retry click goes back
// as a message, {action, task_id}. When the kernel behind the model is gone
// (live.js), the card says so, stops its clock, disables its buttons and
// shows what the store says instead. The pieces are exported for the board.
import { askCard, askServer, clockTime, holdStill, kernelNow, liveView, seconds, staleText } from "./live.js";

// The board takes these from here, so a board's module carries live.js once.
export { askServer, clockTime, holdStill, liveView, staleText };

/** document.createElement with properties and children (null/false skipped). */
export function h(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.flat().filter((c) => c != null && c !== false));
  return node;
}

/** A repeat interval the way it is written: "30s", "5m", "2h". */
export function interval(s) {
  if (s % 3600 === 0) return `${s / 3600}h`;
  if (s % 60 === 0) return `${s / 60}m`;
  return Number.isInteger(s) ? `${s}s` : seconds(s);
}

/**
 * A run's elapsed time. It ticks (live.js tickClocks) while the run is running, in
 * a live view. A view that is not live cannot know that the run still goes: it
 * says when the run started, and no clock runs on. Between attempts (retry) or
 * back in a queue, nothing runs, though the last attempt's start is kept.
 */
export function elapsed(run, lead, live = true) {
  const node = h("span", { className: "cnb-elapsed" });
  if (!run.started_at) {
    node.textContent = "not started";
  } else if (run.completed_at) {
    node.textContent = seconds(run.completed_at - run.started_at);
  } else if (run.orphaned) {
    node.textContent = `started ${clockTime(run.started_at)}`;
  } else if (run.status !== "running") {
    node.textContent = run.status === "retry" ? "waiting to retry" : "waiting";
  } else if (live) {
    node.dataset.since = run.started_at;
    node.textContent = seconds(kernelNow(lead) - run.started_at);
  } else {
    node.textContent = `since ${clockTime(run.started_at)}`;
  }
  return node;
}

export const badge = (status) => h("span", { className: `cnb-badge cnb-${status}`, textContent: status });

/** The status a view shows: a run whose process is gone is not running, whatever its record says. */
export const shownStatus = (run) => (run.orphaned ? "interrupted" : run.status);

/** Said of such a run: the server found its process gone (ui/server.py). */
export const ORPHANED = "The process that ran it is gone, so it is not running (the store, which could not be written, still says so).";

/** "stopping…" on a running run asked to stop that has not yet (it has no Cancel then). */
export const stopping = (run) => run.stopping && !run.orphaned && h("span", {
  className: "cnb-meta cnb-stopping",
  textContent: run.stopping === "timeout" ? "timing out…" : "stopping…",
  title: "Asked to stop: a thread run stops between two Python steps, so one blocked in a call stops when the call returns",
});

export function progressBar(fraction, status) {
  const bar = h("div", { className: `cnb-progress cnb-${status}`, role: "progressbar" });
  const fill = h("div", { className: "cnb-progress-fill" });
  fill.style.width = `${Math.round(fraction * 100)}%`;
  bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
  bar.append(fill);
  return bar;
}

/** "attempt 2 of 3"; nothing before a first attempt (a scheduled run has made none). */
export function attempts(run, short = false) {
  if (!run.attempt) return null;
  return short ? `attempt ${run.attempt}/${run.max_attempts}` : `attempt ${run.attempt} of ${run.max_attempts}`;
}

/**
 * Cancel while unfinished, Retry when finished without success; disabled when
 * `live` is false (nothing could carry the click), except a Cancel the server can
 * file (`fileable`: the store drew the run, and a live process runs it). The span's
 * `data-key` says what it holds, so a redraw can keep the very same buttons (keepActions).
 */
export function actions(run, act, live = true, fileable = false) {
  const filed = !live && fileable && !run.orphaned;
  const button = (label, action) =>
    h("button", {
      className: `cnb-button cnb-${action}`,
      textContent: label,
      disabled: !live && !(filed && action === "cancel"),
      title: live ? `${label} run ${run.task_id}`
        : filed && action === "cancel" ? `Cancel run ${run.task_id}: filed in the store, for whoever holds it`
          : run.orphaned ? `${label}: the process that ran it is gone` : `${label} needs the kernel that drew this`,
      onclick: (event) => {
        event.stopPropagation();
        const pressed = event.currentTarget;
        pressed.closest(".cnb-mini, .cnb-card")?.focus({ preventScroll: true }); // (a disabled button drops it)
        pressed.disabled = true; // until the new state arrives
        act(action, run.task_id);
      },
    });
  const span = h("span", { className: "cnb-actions" },
    run.can_cancel && button("Cancel", "cancel"),
    run.can_retry && button("Retry", "retry"));
  span.dataset.key = `${run.task_id} ${run.can_cancel} ${run.can_retry} ${live} ${filed}`;
  return span;
}

/** Put the buttons of `old` back into `fresh` when they are the same: a press or a focus on them survives a redraw. */
export function keepActions(old, fresh) {
  const before = old?.querySelector(".cnb-actions");
  const after = fresh.querySelector(".cnb-actions");
  if (before && after && before.dataset.key === after.dataset.key && !before.querySelector(":disabled")) {
    after.replaceWith(before);
  }
  return fresh;
}

const SCROLLERS = [".cnb-messages", ".cnb-output", ".cnb-traceback pre"];

// A list drawn out of sight (a reopened notebook lays its cells out later) cannot be scrolled
// yet: it is placed when it first shows. Its geometry said nothing of the reader till then,
// and read as "scrolled to the top", so the output of a reopened card stayed at its start.
const placeOnShow = new ResizeObserver((entries) => entries.forEach(({ target }) => {
  if (target.clientHeight > 0) {
    placeOnShow.unobserve(target);
    target.cnbPlace();
  }
}));

/**
 * Carry the scroll of `old`'s lists over to `fresh` (call the result once `fresh`
 * is in the page): one scrolled to its end follows new lines, like a terminal,
 * and one the reader scrolled stays where it is. Output starts at its end.
 */
function keepScroll(old, fresh) {
  const restores = SCROLLERS.map((selector) => {
    const before = old?.querySelector(selector);
    const after = fresh.querySelector(selector);
    if (before) placeOnShow.unobserve(before);
    if (!after) return null;
    const read = before?.cnbPlaced; // (else where it was meant to be, not where it sits)
    after.cnbFollow = read ? before.scrollTop + before.clientHeight >= before.scrollHeight - 4
      : before?.cnbFollow ?? selector === ".cnb-output";
    after.cnbTop = read ? before.scrollTop : before?.cnbTop ?? 0;
    after.cnbPlace = () => {
      after.scrollTop = after.cnbFollow ? after.scrollHeight : after.cnbTop;
      after.cnbPlaced = true;
    };
    return () => (after.clientHeight > 0 ? after.cnbPlace() : placeOnShow.observe(after));
  });
  return () => restores.forEach((restore) => restore?.());
}

function message(m) {
  const text = m.kind === "show_task" ? `showed run ${m.text}` : m.text;
  return h("li", { className: `cnb-message cnb-${m.kind}` },
    h("span", { className: "cnb-kind", textContent: m.kind === "show_task" ? "card" : m.kind }),
    h("span", { className: "cnb-text", textContent: text }),
    m.detail && h("span", { className: "cnb-message-detail", textContent: m.detail }));
}

/** When a run waiting for its time (scheduled, or to retry) starts; else false. */
export const startsAt = (run) => ["scheduled", "retry"].includes(run.status) && run.scheduled_for;

/** The line that says a view is not live, and why. */
export const staleNote = (text) => h("div", { className: "cnb-stale", role: "status", textContent: text });

/**
 * The card itself, from {title, run, messages, output}. `ui` keeps what the
 * reader opened (the traceback) across redraws; `act(action, task_id)` sends
 * a click. With `live` false the buttons are disabled and no clock runs.
 */
function renderCard({ title, run, messages = [], output = [] },
  { lead, ui, act, live = true, fileable = false }) {
  const p = run.progress;
  const starts = startsAt(run);
  const fraction = p && p.total ? Math.min(1, Math.max(0, p.done / p.total)) : null;
  const attempt = attempts(run);
  const named = run.display_name !== title && run.display_name;  // show_task's message took the title
  const trace = run.traceback && h("details", {
    className: "cnb-traceback",
    open: ui.traceback ?? false,
    ontoggle: (event) => (ui.traceback = event.currentTarget.open),
  }, h("summary", { textContent: "Traceback" }), h("pre", { textContent: run.traceback }));

  return h("div", { className: `cnb-card cnb-is-${shownStatus(run)}${live ? "" : " cnb-not-live"}`, tabIndex: -1 },
    h("div", { className: "cnb-head" },
      h("span", { className: "cnb-title", textContent: title, title }),
      badge(shownStatus(run)),
      stopping(run),
      attempt && h("span", { className: "cnb-meta", textContent: attempt }),
      starts && h("span", { className: "cnb-meta", textContent: `starts ${clockTime(starts)}` }),
      run.every && run.status !== "cancelled"
        && h("span", { className: "cnb-meta cnb-every", textContent: `repeats every ${interval(run.every)}` }),
      elapsed(run, lead, live),
      actions(run, act, live, fileable)),
    h("div", { className: "cnb-sub", textContent: [named, run.task_name, run.task_id].filter(Boolean).join(" · "),
      title: `task ${run.task_name}, run ${run.task_id}` }),
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

/**
 * Draw `card` (renderCard) in `parent` in place of the one there, between
 * `before` and `after` (null/false skipped): its buttons and the scroll of its
 * lists carry over (keepActions, keepScroll).
 */
export function placeCard(parent, card, options, before = [], after = []) {
  const old = parent.querySelector(".cnb-card");
  const focused = old?.contains(document.activeElement) && document.activeElement;
  const fresh = keepActions(old, renderCard(card, options));
  const restoreScroll = keepScroll(old, fresh);
  parent.replaceChildren(...[...before, fresh, ...after].filter(Boolean));
  restoreScroll();
  refocus(focused, fresh);
}

/**
 * After a redraw, give the focus back to `focused` (a kept button: moving it out of the page
 * and back dropped the focus), or to `fallback` (the run's card) when it is gone: the
 * keyboard stays on the run, where it used to fall to the page.
 */
export function refocus(focused, fallback) {
  if (!focused || document.activeElement === focused) return;
  (focused.isConnected ? focused : fallback)?.focus({ preventScroll: true });
}

/** What the last Cancel or Retry said (empty: hidden): a warning when it could not act. */
export const notice = ([text, done]) =>
  h("div", { className: done ? "cnb-notice cnb-notice-done" : "cnb-notice", textContent: text ?? "" });

export default {
  render({ model, el }) {
    el.classList.add("cnb");
    const ui = {};
    let asked = null; // what the store said, once the kernel is gone
    const view = liveView(model, el, {
      lost: () => hold.request(),
      told: () => hold.request(),
      ask: async () => { // true while the run may still change
        const answer = await askCard(model.get("source")?.home ?? "", model.get("task_id"));
        if (!answer) return false;
        asked = answer.card ? answer : { missing: true };
        hold.request();
        return Boolean(answer.card && !answer.card.run.completed_at);
      },
    });

    const draw = () => {
      const live = view.live();
      const fromStore = !live && asked?.card;
      const [title, run, messages, output] = ["title", "run", "messages", "output"].map((name) => model.get(name));
      const card = fromStore ? { ...fromStore, title: title || fromStore.title } : { title, run, messages, output };
      if (!card.run.task_id) return;
      const stale = !live && staleNote(staleText(view.why(), asked) + (fromStore?.run.orphaned ? ` ${ORPHANED}` : ""));
      placeCard(el, card, { lead: view.lead(), ui, act: view.act, live, fileable: Boolean(fromStore) },
        [stale], [notice(view.notice())]);
    };
    const hold = holdStill(el, draw);
    hold.request();
    model.on("change", hold.request);
    return view.start(() => {
      model.off("change", hold.request);
      hold.release();
    });
  },
};
