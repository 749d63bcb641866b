// The task board: a column per status group, newest runs first, a cap per
// column with "show more", filter menus, and a details pane for one run.
// Drawn from traits only (title, filter, lanes, limits, choices, total,
// selected, detail, notice, clock, source); the view sets filter, limits and
// selected, and sends Cancel and Retry clicks as messages.
//
// Updates happen in place, keyed by run id: a run's node stays while the run
// stays in its column, so a scrolled column keeps its place, focus stays, and
// the button under a press is the one released on. While the pointer is
// pressed in the columns, or moves over them, the columns hold still
// (live.js holdStill) and catch up after. When the kernel is gone the board
// says so and shows what the store says (ui/server.py).
import {
  actions, askServer, attempts, badge, clockTime, elapsed, h, holdStill, keepActions, liveView, notice, ORPHANED,
  placeCard, progressBar, refocus, shownStatus, staleNote, staleText, startsAt, stopping,
} from "./task_card.js";

const ASKED_MS = 5000; // a change of the columns this soon after the reader filtered is the answer
const MENUS = [["app", "app"], ["task_name", "task"], ["session_id", "session"], ["status", "status"]];

/**
 * How a reader knows a filter value: a session's notebook by its name
 * ("notebook:/home/ana/q3/report.ipynb" -> "report.ipynb"), with as much of its
 * folder as tells two of the same name apart.
 */
export function labels(key, values) {
  const shown = new Map(values.map((v) => [v, v]));
  if (key !== "session_id") return shown;
  const parts = (v) => {
    const path = v.slice(v.indexOf(":") + 1);
    return path.includes("/") ? path.split("/").filter(Boolean) : [v]; // "local:ana" stays as it is
  };
  const depth = new Map(values.map((v) => [v, 1]));
  for (let round = 0; round < 8; round++) {
    const named = new Map(); // label -> the values it would name
    for (const v of values) {
      const label = parts(v).slice(-depth.get(v)).join("/");
      shown.set(v, label);
      named.set(label, [...(named.get(label) ?? []), v]);
    }
    const clashing = [...named.values()].filter((same) => same.length > 1).flat();
    if (!clashing.length) break;
    for (const v of clashing) depth.set(v, depth.get(v) + 1);
  }
  return shown;
}

/**
 * The filter menus, drawn into `filters`. Each menu's <select> is made once and its options
 * patched: a menu the reader has focused, or open, stays so while new choices arrive.
 */
function patchMenus(filters, selects, state, set) {
  const filter = state("filter");
  const choices = state("choices");
  // The app menu only where the store holds more than one app.
  const shown = MENUS.filter(([key]) => key !== "app" || (choices.app ?? []).length > 1 || filter.app);
  for (const [key, label] of shown) {
    const values = new Set(choices[key] ?? []);
    if (filter[key]) values.add(filter[key]); // a filter set in Python stays visible
    const names = labels(key, [...values]);
    let menu = selects.get(key);
    if (!menu) {
      const select = h("select", {
        className: "cnb-select",
        onchange: (event) => {
          const next = { ...state("filter") };
          if (event.currentTarget.value) next[key] = event.currentTarget.value;
          else delete next[key];
          set("filter", next);
        },
      });
      menu = { select, label: h("label", { className: "cnb-filter" }, `${label} `, select), key: "" };
      selects.set(key, menu);
    }
    menu.select.title = filter[key] ? `${key}: ${filter[key]}` : `filter by ${key}`;
    const options = JSON.stringify([...values].map((v) => [v, names.get(v)]));
    if (options !== menu.key) {
      menu.key = options;
      menu.select.replaceChildren(h("option", { value: "", textContent: "all" }),
        ...[...values].map((v) => h("option", { value: v, textContent: names.get(v), title: v })));
    }
    menu.select.value = filter[key] ?? "";
  }
  const wanted = shown.map(([key]) => selects.get(key).label);
  if (wanted.length !== filters.children.length || wanted.some((node, i) => filters.children[i] !== node)) {
    const focused = filters.contains(document.activeElement) && document.activeElement;
    filters.replaceChildren(...wanted);
    refocus(focused, null);
  }
}

/** What tells runs of one task apart: what it last said, when it started (or starts: a
 *  scheduled run's queued time read as its start), its id's tail. */
function who(card) {
  const starts = startsAt(card);
  const at = starts || (card.started_at ?? card.created_at);
  const text = [card.said, at && (starts ? `starts ${clockTime(at)}` : clockTime(at)), card.task_id.slice(-6)]
    .filter(Boolean).join(" · ");
  const when = at && `${starts ? "starts" : card.started_at ? "started" : "queued"} ${clockTime(at, true)}`;
  const full = [`run ${card.task_id}`, when, card.said].filter(Boolean).join(" · ");
  return h("div", { className: "cnb-who", textContent: text, title: full });
}

/** The inside of a mini card (the <li> itself stays, and so does its focus). */
function miniParts(card, { lead, act, live, fileable }) {
  const attempt = card.max_attempts > 1 && attempts(card, true);
  const status = shownStatus(card);
  const note = card.orphaned ? ORPHANED : card.note;
  const noteClass = ["failed", "timeout", "interrupted"].includes(status) ? "cnb-note cnb-error" : "cnb-note";
  return [
    h("div", { className: "cnb-head" },
      h("span", { className: "cnb-title", textContent: card.title, title: card.title }), badge(status),
      stopping(card)),
    who(card),
    h("div", { className: "cnb-head cnb-meta" },
      elapsed(card, lead, live),
      attempt && h("span", { textContent: attempt }),
      actions(card, act, live, fileable)),
    card.progress != null && progressBar(card.progress, card.status),
    note && h("div", { className: noteClass, textContent: note, title: note }),
  ];
}

/** One mini card: created once per run and column, patched when what it shows changes. */
function miniCard(card, context) {
  const node = h("li", {
    tabIndex: 0,
    title: `run ${card.task_id}: show details`,
    onclick: () => context.select(node.dataset.taskId),
    onkeydown: (event) => { // (a handler property that returns false cancels the key: Tab, a button's Enter)
      if (event.key === "Enter" && event.target === node) node.click();
    },
  });
  node.dataset.taskId = card.task_id;
  const mini = { node, key: "" };
  patchMini(mini, card, context);
  return mini;
}

function patchMini(mini, card, context) {
  const selected = context.selected === card.task_id;
  const key = JSON.stringify([card, selected, context.live, context.fileable, context.epoch]);
  // A button clicked in a live view waits for the next state, not for its own run to change
  // (a Retry leaves the retried run as it was).
  if (key === mini.key && !(context.live && mini.node.querySelector(".cnb-actions :disabled"))) return;
  mini.key = key;
  mini.node.className = `cnb-mini cnb-is-${shownStatus(card)}${selected ? " cnb-selected" : ""}`;
  const fresh = h("div", {}, miniParts(card, context));
  keepActions(mini.node, fresh);
  mini.node.replaceChildren(...fresh.childNodes);
}

/** A column: made once, its cards updated in place. */
function makeLane(label, context) {
  const count = h("span", { className: "cnb-count" });
  const list = h("ol", { className: "cnb-lane-cards" });
  const more = h("button", {
    className: "cnb-button cnb-more",
    onclick: () => {
      const limits = context.state("limits");
      const limit = (context.column(label)?.limit ?? 0) + context.state("page_size");
      context.set("limits", { ...limits, [label]: limit });
    },
  });
  const root = h("section", { className: "cnb-lane" },
    h("header", { className: "cnb-lane-head" }, h("span", { textContent: label }), count),
    list, more);
  return { root, count, list, more, minis: new Map() };
}

function updateLane(lane, column, context) {
  lane.count.textContent = column.count;
  const wanted = new Set(column.cards.map((card) => card.task_id));
  for (const [id, mini] of lane.minis) { // first the runs that left, so no node that stays moves
    if (!wanted.has(id)) {
      mini.node.remove();
      lane.minis.delete(id);
    }
  }
  let cursor = lane.list.firstChild;
  for (const card of column.cards) { // newest first; a new run goes in where it belongs
    let mini = lane.minis.get(card.task_id);
    if (mini) patchMini(mini, card, context);
    else lane.minis.set(card.task_id, (mini = miniCard(card, context)));
    if (mini.node === cursor) cursor = cursor.nextSibling;
    else lane.list.insertBefore(mini.node, cursor);
  }
  const hidden = column.count - column.cards.length;
  lane.more.hidden = hidden <= 0;
  lane.more.textContent = `Show more (${hidden} more)`;
}

export default {
  render({ model, el }) {
    el.classList.add("cnb", "cnb-board");
    const ui = {};
    let asked = null; // what the store said, once the kernel is gone
    const ask = async () => {
      const columns = (asked?.lanes ?? model.get("lanes")).map((lane) => [lane.label, lane.statuses]);
      const query = { columns, filter: model.get("filter"),
        limits: model.get("limits"), page: model.get("page_size"), selected: model.get("selected") };
      const answer = await askServer("board", { home: model.get("source")?.home ?? "", view: JSON.stringify(query) });
      if (!answer) return false;
      asked = answer;
      if ("selected" in answer) model.set("selected", answer.selected); // closed by the filter (no kernel to sync)
      redrawAll();
      return !answer.missing; // other kernels may still be changing the store
    };
    const told = () => { // what the view learned of a click the kernel has not heard
      drawNotice();
      hold.request();
      holdDetail.request();
    };
    const view = liveView(model, el, { lost: redrawAll, ask, told });

    // Traits, or what the store said in their place once the kernel is gone.
    const state = (name) => (!view.live() && asked && name in asked ? asked[name] : model.get(name));
    const fileable = () => !view.live() && Boolean(asked) && !asked.missing; // the store drew it: see actions
    const set = (name, value) => {
      model.set(name, value);
      if (view.live()) model.save_changes();
      else ask(); // nobody else will compute what this changes
    };

    const title = h("span", { className: "cnb-board-title" });
    const total = h("span", { className: "cnb-meta cnb-total" });
    const filters = h("span", { className: "cnb-filters" });
    const stale = h("div");
    const lanesRoot = h("div", { className: "cnb-lanes" });
    // A region the focus moves to when the reader opens it: Tab goes on to its buttons, not
    // through every card after the run's, and Escape closes it.
    const detail = h("div", { className: "cnb-detail", tabIndex: -1, role: "region",
      onkeydown: (event) => {
        if (event.key === "Escape" && state("selected")) close();
      } });
    const footer = h("div");
    // Always there, shown or hidden: its coming and going never moves what is under the pointer.
    const pausedText = "paused while the pointer is over the runs"; // (whole on hover where a narrow head cuts it)
    const paused = h("span", { className: "cnb-meta cnb-paused", textContent: pausedText, title: pausedText });
    const head = h("div", { className: "cnb-board-head" }, title, total, paused, filters);
    el.replaceChildren(head, stale, lanesRoot, detail, footer);

    const lanes = new Map(); // label -> lane
    const context = {
      state, set, act: view.act, lead: 0, live: true, fileable: false, selected: "",
      epoch: 0, // raised by a notice: every card is drawn afresh, and a refused button comes back
      column: (label) => state("lanes").find((c) => c.label === label),
      revealing: false, // the reader opened details: scroll them into view once drawn
      select: (task_id) => {
        context.revealing = state("selected") !== task_id;
        set("selected", context.revealing ? task_id : "");
      },
    };

    const drawTitle = () => (title.textContent = model.get("title"));
    const drawTotal = () => (total.textContent = `${state("total")} run${state("total") === 1 ? "" : "s"}`);
    const selects = new Map(); // filter key -> its menu
    // The columns a filter the reader picked gives show at once, even with the pointer
    // resting on a card (picked from the keyboard): the total above them already does (w56).
    let filteredAt = -Infinity;
    const filterBy = (key, value) => {
      filteredAt = performance.now();
      set(key, value);
    };
    const drawMenus = () => patchMenus(filters, selects, state, filterBy);
    const lanesChanged = () => {
      const asked = performance.now() - filteredAt < ASKED_MS;
      filteredAt = -Infinity;
      if (asked) hold.now();
      else hold.request();
    };
    const drawStale = () =>
      stale.replaceChildren(...(view.live() ? [] : [staleNote(staleText(view.why(), asked))]));
    const drawLanes = () => {
      Object.assign(context, { lead: view.lead(), live: view.live(), fileable: fileable() });
      context.selected = state("selected");
      const columns = state("lanes");
      const focused = lanesRoot.contains(document.activeElement) && document.activeElement;
      const focusedRun = focused && focused.closest(".cnb-mini")?.dataset.taskId;
      if (columns.map((c) => c.label).join("\n") !== [...lanes.keys()].join("\n")) {
        lanes.clear();
        for (const column of columns) lanes.set(column.label, makeLane(column.label, context));
        lanesRoot.replaceChildren(...[...lanes.values()].map((lane) => lane.root));
      }
      for (const column of columns) updateLane(lanes.get(column.label), column, context);
      if (focused) { // (the run may have moved to another column)
        const lane = [...lanes.values()].find((l) => l.minis.has(focusedRun));
        refocus(focused, lane?.minis.get(focusedRun).node);
      }
    };
    const hold = holdStill(lanesRoot, drawLanes, {
      hover: true, waiting: (held) => (paused.style.visibility = held ? "visible" : "hidden") });
    paused.style.visibility = "hidden";
    // Closed, the details give the focus back to their run's card (else it fell to the page).
    const close = () => {
      const run = state("selected");
      set("selected", "");
      lanesRoot.querySelector(`.cnb-mini[data-task-id="${CSS.escape(run)}"]`)?.focus({ preventScroll: true });
    };
    const drawDetail = () => {
      const card = state("detail");
      const selected = state("selected");
      if (!card.run || card.task_id !== selected) return detail.replaceChildren();
      const opening = !detail.hasChildNodes();
      placeCard(detail, card, { lead: view.lead(), ui, act: view.act, live: view.live(), fileable: fileable() }, [
        h("div", { className: "cnb-detail-head" },
          h("span", { className: "cnb-label", textContent: `Run details · ${card.task_id}` }),
          h("button", { className: "cnb-button", textContent: "Close", onclick: close }))]);
      detail.ariaLabel = `Run details · ${card.task_id}`;
      // In a narrow window the columns stack, and the details open below them all: bring them in.
      if (opening && context.revealing) {
        detail.scrollIntoView({ block: "nearest" });
        detail.focus({ preventScroll: true });
      }
      context.revealing = false;
    };
    const holdDetail = holdStill(detail, drawDetail);
    const drawNotice = () => {
      context.epoch += 1;
      footer.replaceChildren(notice(view.notice()));
    };
    function redrawAll() {
      drawStale();
      drawTotal();
      drawMenus();
      hold.request();
      holdDetail.request();
    }

    const listeners = [
      ["change:title", drawTitle],
      ["change:total", drawTotal],
      ["change:filter change:choices", drawMenus],
      ["change:notice", drawNotice],
      ["change:lanes", lanesChanged],
      ["change:selected change:notice", hold.request],
      ["change:detail change:selected change:notice", holdDetail.request],
    ];
    drawStale();
    for (const [events, draw] of listeners) {
      draw();
      model.on(events, draw);
    }
    return view.start(() => {
      for (const [events, draw] of listeners) model.off(events, draw);
      hold.release();
      holdDetail.release();
    });
  },
};
