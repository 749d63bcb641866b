// The task board: a column per status group, newest runs first, a cap per
// column with "show more", filter menus, and a details pane for one run.
// Drawn from traits only (title, filter, lanes, limits, choices, total,
// selected, detail, notice, clock); the view sets filter, limits and
// selected, and sends Cancel and Retry clicks as messages.
import { actions, badge, elapsed, h, kernelClock, notice, progressBar, renderCard, tickClocks } from "./task_card.js";

const MENUS = [["app", "app"], ["task_name", "task"], ["session_id", "session"], ["status", "status"]];

function save(model, name, value) {
  model.set(name, value);
  model.save_changes();
}

function menus(model) {
  const filter = model.get("filter");
  const choices = model.get("choices");
  // The app menu only where the store holds more than one app.
  const shown = MENUS.filter(([key]) => key !== "app" || (choices.app ?? []).length > 1 || filter.app);
  return shown.map(([key, label]) => {
    const values = new Set(choices[key] ?? []);
    if (filter[key]) values.add(filter[key]); // a filter set in Python stays visible
    const select = h("select", {
      className: "cnb-select",
      title: `filter by ${key}`,
      onchange: (event) => {
        const next = { ...model.get("filter") };
        if (event.currentTarget.value) next[key] = event.currentTarget.value;
        else delete next[key];
        save(model, "filter", next);
      },
    }, h("option", { value: "", textContent: `all` }),
      [...values].map((v) => h("option", { value: v, textContent: v, selected: v === filter[key] })));
    return h("label", { className: "cnb-filter" }, `${label} `, select);
  });
}

function miniCard(card, { model, lead, act }) {
  const selected = model.get("selected") === card.task_id;
  return h("li", {
    className: `cnb-mini cnb-is-${card.status}${selected ? " cnb-selected" : ""}`,
    tabIndex: 0,
    title: `run ${card.task_id}: show details`,
    onclick: () => save(model, "selected", selected ? "" : card.task_id),
    onkeydown: (event) => event.key === "Enter" && event.currentTarget.click(),
  },
  h("div", { className: "cnb-head" },
    h("span", { className: "cnb-title", textContent: card.title }), badge(card.status)),
  h("div", { className: "cnb-head cnb-meta" },
    elapsed(card, lead),
    card.max_attempts > 1 && h("span", { textContent: `attempt ${card.attempt}/${card.max_attempts}` }),
    actions(card, act)),
  card.progress != null && progressBar(card.progress, card.status),
  card.note && h("div", {
    className: card.status === "completed" ? "cnb-note" : "cnb-note cnb-error",
    textContent: card.note,
  }));
}

function lane(column, context) {
  const { model } = context;
  const hidden = column.count - column.cards.length;
  return h("section", { className: "cnb-lane" },
    h("header", { className: "cnb-lane-head" },
      h("span", { textContent: column.label }),
      h("span", { className: "cnb-count", textContent: column.count })),
    h("ol", { className: "cnb-lane-cards" }, column.cards.map((card) => miniCard(card, context))),
    hidden > 0 && h("button", {
      className: "cnb-button cnb-more",
      textContent: `Show more (${hidden} more)`,
      onclick: () => {
        const limit = column.limit + model.get("page_size");
        save(model, "limits", { ...model.get("limits"), [column.label]: limit });
      },
    }));
}

export default {
  render({ model, el }) {
    el.classList.add("cnb", "cnb-board");
    const ui = {};
    const [lead, stopClock] = kernelClock(model);
    const act = (action, task_id) => model.send({ action, task_id });
    const title = h("span", { className: "cnb-board-title" });
    const total = h("span", { className: "cnb-meta cnb-total" });
    const filters = h("span", { className: "cnb-filters" });
    const lanes = h("div", { className: "cnb-lanes" });
    const detail = h("div", { className: "cnb-detail" });
    const footer = h("div");
    el.replaceChildren(h("div", { className: "cnb-board-head" }, title, total, filters), lanes, detail, footer);

    const drawTitle = () => (title.textContent = model.get("title"));
    const drawTotal = () => (total.textContent = `${model.get("total")} run${model.get("total") === 1 ? "" : "s"}`);
    const drawMenus = () => filters.replaceChildren(...menus(model)); // not on every update: a menu may be open
    const drawLanes = () => {
      const columns = model.get("lanes");
      lanes.style.gridTemplateColumns = `repeat(${columns.length}, minmax(0, 1fr))`;
      lanes.replaceChildren(...columns.map((column) => lane(column, { model, lead: lead(), act })));
    };
    const drawDetail = () => {
      const card = model.get("detail");
      if (!card.run) return detail.replaceChildren();
      detail.replaceChildren(
        h("div", { className: "cnb-detail-head" },
          h("span", { className: "cnb-label", textContent: "Run details" }),
          h("button", { className: "cnb-button", textContent: "Close", onclick: () => save(model, "selected", "") })),
        renderCard(card, { lead: lead(), ui, act }));
    };
    const drawNotice = () => footer.replaceChildren(notice(model.get("notice")));

    const listeners = [
      ["change:title", drawTitle],
      ["change:total", drawTotal],
      ["change:filter change:choices", drawMenus],
      ["change:lanes change:selected change:notice", drawLanes], // a redraw re-enables a refused button
      ["change:detail", drawDetail],
      ["change:notice", drawNotice],
    ];
    for (const [events, draw] of listeners) {
      draw();
      model.on(events, draw);
    }
    const stopTicking = tickClocks(el, lead);
    return () => {
      for (const [events, draw] of listeners) model.off(events, draw);
      stopClock();
      stopTicking();
    };
  },
};
