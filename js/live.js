// What a view knows about the kernel behind its model, and what it does when
// that kernel is gone.
//
// A widget model is kept current by the kernel that made it. When that kernel
// restarts, dies or is shut down, or the model was drawn from a saved notebook
// (nothing behind it at all), the view says so at once: not live, the last
// state it had, clocks stopped, buttons disabled, and nothing sent (a send
// into a dead connection is an error in the page). Then it asks the Jupyter
// server's capsule_nb extension (ui/server.py) what the store says now.
//
// liveView() is all of it, for the card and the board alike: a view draws
// and leaves the rest to it.
//
// Only public pieces of the widget manager are used (kernel, context,
// get_state_sync, has_model), each checked before use: where one is missing
// (Voila, another front end) the view simply assumes its kernel lives.

// A kernel restarted from elsewhere (another tab, the REST API) says only "starting", the new
// process's first word, and the page may not hear even that (it can go out before the page
// listens again). A kernel that drew a view has started long since. What the page does hear
// is the new process's next message, signed with a session of its own: follow() compares
// each with the model's kernel_session.
const GONE = new Set(["restarting", "autorestarting", "starting", "dead", "terminating"]);
const STATE = "application/vnd.jupyter.widget-state+json";

// Set in the state saveOurs() writes: a model that has it was drawn from a
// saved notebook, not by a kernel.
export const SAVED = "_capsule_saved";

export const REASONS = {
  restarted: "its kernel restarted",
  stopped: "its kernel stopped",
  saved: "drawn from the saved notebook",
};

/** Connect `slot` to a Lumino signal if there is one; returns the disconnect. */
function on(signal, slot) {
  if (!signal || typeof signal.connect !== "function") return () => {};
  signal.connect(slot);
  return () => signal.disconnect(slot);
}

/**
 * Follow the kernel behind `model`. `changed()` runs once, when it goes.
 * Returns { live(), why(), send(content), dispose() }; send() is a no-op
 * (false) once the kernel is gone, and never throws.
 */
function follow(model, changed) {
  const manager = model.widget_manager;
  let why = model.get(SAVED) ? "saved" : "";
  let stops = [];
  const lose = (reason) => {
    if (why) return;
    why = reason;
    stops.forEach((stop) => stop());
    stops = [];
    changed();
  };
  const kernel = manager?.kernel;
  if (!why && kernel) {
    if (kernel.isDisposed || GONE.has(kernel.status)) why = "stopped";
    stops.push(on(kernel.statusChanged, (_, status) => {
      if (GONE.has(status)) lose(status === "dead" || status === "terminating" ? "stopped" : "restarted");
    }));
    const session = model.get("kernel_session");
    if (session) {
      stops.push(on(kernel.iopubMessage, (_, msg) => {
        const from = msg?.header?.session;
        if (from && from !== session) lose("restarted"); // (the server's "dead" came as a status first)
      }));
    }
    stops.push(on(kernel.disposed, () => lose("stopped")));
    stops.push(on(manager.context?.sessionContext?.kernelChanged, () => lose("stopped")));
  }
  const connected = () => !why && !(kernel && (kernel.isDisposed || kernel.connectionStatus === "disconnected"));
  return {
    live: () => !why,
    why: () => why,
    send(content) {
      if (!connected()) return false;
      try {
        model.send(content);
        return true;
      } catch {
        return false; // the connection went between the check and the send
      }
    },
    dispose() {
      stops.forEach((stop) => stop());
      stops = [];
    },
  };
}

// ------------------------------------------------------- saving our state

const isView = (entry) => String(entry?.state?._anywidget_id ?? "").startsWith("capsule_nb.");
// Ours: a card or board, or a `cpsl.ui.Page` (an ipywidgets box of them, with its headings).
const isOurs = (entry) => isView(entry) || (entry?.state?._dom_classes ?? []).includes("cnb-page");

/** The model ids an entry's state points at ("IPY_MODEL_<id>": its layout, a page's children). */
function references(entry) {
  const found = [];
  for (const value of Object.values(entry?.state ?? {})) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (typeof item === "string" && item.startsWith("IPY_MODEL_")) found.push(item.slice(10));
    }
  }
  return found;
}

/** `ids` and every id their entries in `state` point at, and so on (a page, its children, their layouts). */
function reach(ids, state) {
  const found = new Set();
  const visit = (id) => {
    if (found.has(id)) return;
    found.add(id);
    references(state[id]).forEach(visit);
  };
  [...ids].forEach(visit);
  return found;
}

const saving = (globalThis.__capsuleNbSaving ??= new WeakMap()); // manager -> kept entries

const VIEW = "application/vnd.jupyter.widget-view+json";

/**
 * The ids of the widgets the notebook's outputs show; null when they cannot be read. A
 * kernel restarted leaves its models with the widget manager (nothing closes them), and a
 * cell run again drops their outputs: saved all the same, a notebook grew with each restart.
 */
function displayed(notebook) {
  try {
    const ids = new Set();
    for (const cell of notebook.cells) {
      const outputs = cell.outputs;
      for (let i = 0; outputs && i < outputs.length; i++) {
        const id = outputs.get(i).data?.[VIEW]?.model_id;
        if (id) ids.add(id);
      }
    }
    return ids;
  } catch {
    return null;
  }
}

/**
 * Keep capsule_nb's widgets in the notebook when it is saved, whatever the
 * "Save Widget State Automatically" setting says: a reopened notebook then
 * draws each card and board as it last was (marked SAVED, so not live) where
 * it would otherwise say "model not found". Other widgets are left as the
 * setting says. One hook per notebook, however many views.
 */
function saveOurs(model) {
  const manager = model.widget_manager;
  const context = manager?.context;
  if (!context?.saveState || !context.model?.setMetadata || typeof manager.get_state_sync !== "function"
      || typeof manager.has_model !== "function" || saving.has(manager)) return;
  const kept = {}; // id -> entry: ours and what they point at, as last seen live
  saving.set(manager, kept);

  const capture = () => {
    let state;
    try {
      state = manager.get_state_sync({ drop_defaults: true }).state; // live models only
    } catch {
      return;
    }
    const ours = Object.keys(state).filter((id) => isOurs(state[id]));
    for (const id of reach(ours, state)) {
      const entry = state[id];
      if (entry) kept[id] = isView(entry) ? { ...entry, state: { ...entry.state, [SAVED]: true } } : entry;
    }
  };
  const write = () => {
    capture();
    const widgets = context.model.getMetadata("widgets") ?? {};
    const saved = widgets[STATE] ?? { version_major: 2, version_minor: 0, state: {} };
    const state = { ...saved.state };
    const shown = displayed(context.model);
    const inSight = shown && reach(shown, { ...state, ...kept }); // shown, or inside a page shown
    const keep = (id) => manager.has_model(id) && (!inSight || inSight.has(id));
    const gone = Object.keys(state).filter((id) => isOurs(state[id]) && !keep(id)); // ours from an earlier save
    for (const id of reach(gone, state)) delete state[id];
    const wanted = reach(Object.keys(kept).filter((id) => isOurs(kept[id]) && keep(id)), kept);
    for (const id of Object.keys(kept)) {
      if (wanted.has(id)) state[id] = kept[id];
      else delete kept[id]; // (a view closed, a page's child replaced)
    }
    context.model.setMetadata("widgets", { ...widgets, [STATE]: { ...saved, state } });
  };
  // A restart makes every model not live (and so left out of get_state_sync):
  // note them first, while the manager still counts them live.
  on(context.sessionContext?.statusChanged, (_, status) => GONE.has(status) && capture());
  on(context.saveState, (_, phase) => phase === "started" && write());
}

// ------------------------------------------------------ asking the server

let config;
function pageConfig() {
  if (config === undefined) {
    try {
      config = JSON.parse(document.getElementById("jupyter-config-data")?.textContent ?? "null");
    } catch {
      config = null;
    }
  }
  return config;
}

/** The page's `_xsrf` cookie: the Jupyter server wants it back with a POST (as JupyterLab's requests send it). */
const xsrf = () => document.cookie.match(/(?:^|;\s*)_xsrf=([^;]*)/)?.[1];

/** GET (or POST) capsule-nb/api/<what> from the Jupyter server; null when it cannot answer. */
// A server without our extension (standalone Voilà loads none) redirects, or answers 403 or
// 404 with a page of its own: each such ask was a console error. Such a page is asked once.
// Once the extension has answered, nothing stops the asking: a proxy's redirect to a login
// page or its 502 page is passing, and the views must catch up after it.
let answered = false;
let noExtension = false;

export async function askServer(what, params, method = "GET") {
  const page = pageConfig();
  if (!page || noExtension) return null;
  const url = new URL(`${page.baseUrl ?? "/"}capsule-nb/api/${what}`, location.origin);
  for (const [key, value] of Object.entries(params)) url.searchParams.set(key, value);
  const headers = page.token ? { Authorization: `token ${page.token}` } : {};
  if (method !== "GET" && xsrf()) headers["X-XSRFToken"] = decodeURIComponent(xsrf());
  try {
    const response = await fetch(url, { method, headers, credentials: "same-origin", cache: "no-store",
      redirect: "manual" });
    if (response.ok) {
      answered = true;
      return await response.json();
    }
    const foreign = response.type === "opaqueredirect"
      || ([403, 404].includes(response.status) && !response.headers.get("content-type")?.includes("json"));
    if (foreign && !answered) noExtension = true; // (our routes answer JSON, refusals too)
    return null;
  } catch {
    return null;
  }
}

const batches = new Map(); // store -> { ids: Set, waiting: [resolve] }

/** The store's card for `task_id`, asked with every other card asking in the same tick. */
export function askCard(home, task_id) {
  let batch = batches.get(home);
  if (!batch) {
    batch = { ids: new Set(), waiting: [] };
    batches.set(home, batch);
    setTimeout(async () => {
      batches.delete(home);
      const answer = await askServer("cards", { home, ids: [...batch.ids].join(",") });
      for (const resolve of batch.waiting) resolve(answer);
    }, 0);
  }
  batch.ids.add(task_id);
  return new Promise((resolve) => batch.waiting.push(resolve)).then((answer) =>
    answer && answer.cards ? { card: answer.cards[task_id] ?? null, now: answer.now } : null);
}

/**
 * `ask()` now and again every `ms` (the first `soon` times every `soonMs`) for as long as
 * it says there is more to learn (true): a server that cannot answer is not asked again
 * and again. Returns the stop (the view is gone).
 */
function keepAsking(ask, ms = 5000, { soon = 0, soonMs = ms } = {}) {
  let timer = null;
  let stopped = false;
  const round = async () => {
    timer = null;
    if (stopped) return;
    const again = await ask();
    if (again && !stopped) timer = setTimeout(round, soon-- > 0 ? soonMs : ms);
  };
  round();
  return () => {
    stopped = true;
    if (timer) clearTimeout(timer);
  };
}

let owningKeys = false;

/**
 * A plain key pressed in a view is the view's, not the notebook's: with a card's button
 * focused, "d d" deleted its cell. JupyterLab skips its shortcuts for a focused element
 * that says so (its command-mode keys match ":focus" itself); a key with Ctrl, Alt, Meta or
 * Shift (Ctrl+S, Shift+Enter) goes on to it. One listener for every view, on the window
 * while it captures: it comes before JupyterLab's.
 */
function ownKeys() {
  if (owningKeys) return;
  owningKeys = true;
  window.addEventListener("keydown", (event) => {
    const target = event.target;
    if (!(target instanceof Element) || !target.closest(".cnb")) return;
    if (event.ctrlKey || event.altKey || event.metaKey || event.shiftKey) {
      target.removeAttribute("data-lm-suppress-shortcuts");
    } else {
      target.setAttribute("data-lm-suppress-shortcuts", "true");
    }
  }, true);
}

// ------------------------------------------------------------ holding still

/**
 * Hold a view's redraws while the pointer is pressed in `root` (so the
 * button under it is the one released on) and, with `hover`, while it moves
 * over `root` and for `rest` ms after (so what is under it stays put).
 * `waiting(true/false)` is told when a redraw starts and stops waiting, so the
 * view can say it is paused. Returns { request(): draw now or when let go, now(): draw now
 * whatever holds it (what the reader asked for themselves), release() }.
 */
export function holdStill(root, draw, { hover = false, rest = 1500, waiting = () => {} } = {}) {
  let pressed = false;
  let hovering = false;
  let pending = false;
  let restTimer = null;
  const held = () => pressed || hovering;
  const wait = (value) => {
    if (pending !== value) waiting((pending = value));
  };
  const flush = () => {
    if (pending && !held()) {
      wait(false);
      draw();
    }
  };
  const request = () => {
    if (held()) wait(true);
    else draw();
  };
  const down = () => (pressed = true);
  const up = () => {
    if (!pressed) return;
    pressed = false;
    hovering = false; // what the press did shows now, even with the pointer still on the button
    clearTimeout(restTimer);
    setTimeout(flush, 0); // after the click this press makes has been handled
  };
  const moved = () => {
    hovering = true;
    clearTimeout(restTimer);
    restTimer = setTimeout(() => {
      // A pointer resting on a button or a card is about to press it: what is under it holds
      // still until it moves on, or the press would land on whichever run moved there meanwhile.
      if (root.querySelector(":is(button, [tabindex]):hover")) return;
      hovering = false;
      flush();
    }, rest);
  };
  const left = () => {
    clearTimeout(restTimer);
    hovering = false;
    flush();
  };
  root.addEventListener("pointerdown", down);
  window.addEventListener("pointerup", up, true);
  window.addEventListener("pointercancel", up, true);
  if (hover) {
    root.addEventListener("pointermove", moved);
    root.addEventListener("pointerleave", left);
  }
  return {
    request,
    now() {
      wait(false);
      draw();
    },
    release() {
      clearTimeout(restTimer);
      root.removeEventListener("pointerdown", down);
      window.removeEventListener("pointerup", up, true);
      window.removeEventListener("pointercancel", up, true);
      root.removeEventListener("pointermove", moved);
      root.removeEventListener("pointerleave", left);
    },
  };
}

// Made once: a formatter per call (toLocaleTimeString) costs more than drawing a card.
const TIME = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const DATE_TIME = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

/** "14:02:07" in the reader's locale (`dated`: with the day). */
export const clockTime = (seconds, dated = false) => (dated ? DATE_TIME : TIME).format(seconds * 1000);

/** What a view that is not live says above what it shows. */
export function staleText(why, asked) {
  const head = `Not live: ${REASONS[why] ?? "its kernel is gone"}.`;
  if (!asked) return `${head} Showing the last state it received.`;
  if (asked.missing) return `${head} The store no longer has this; showing the last state it received.`;
  return `${head} Showing the store as of ${clockTime(asked.now)}.`;
}

// ------------------------------------------------------- the kernel's clock

/** Seconds since the epoch on the kernel's clock, given how far the browser's runs ahead. */
export const kernelNow = (lead) => Date.now() / 1000 - lead;

/** A duration, "4.2s", "3m 5s" or "2h 10m"; never below 0 (two machines' clocks may disagree). */
export function seconds(s) {
  s = Math.max(0, s);
  if (s < 60) return `${s.toFixed(1)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

/**
 * Follow the kernel's clock: `clock` is the kernel's time when the state was
 * sent, so the browser's lead over it is measured as each update arrives.
 * Returns a getter of that lead and the cleanup.
 */
function kernelClock(model) {
  let lead = 0;
  const measure = () => (lead = Date.now() / 1000 - model.get("clock"));
  measure();
  model.on("change:clock", measure);
  return [() => lead, () => model.off("change:clock", measure)];
}

/** Advance every running clock under root once a second (`lead` is a getter); returns the cleanup. */
function tickClocks(root, lead) {
  const timer = setInterval(() => {
    const now = kernelNow(lead());
    for (const node of root.querySelectorAll(".cnb-elapsed[data-since]")) {
      node.textContent = seconds(now - Number(node.dataset.since));
    }
  }, 1000);
  return () => clearInterval(timer);
}

// ------------------------------------------------------- a click unheard

/** How long a kernel may take to say it heard a click before the view does without it. */
const HEARD_MS = 1000;

/**
 * A kernel running a cell reads a click only once the cell ends, and a cell waiting on this
 * very run (a loop on its status, `await h.result()`) never would. The kernel says at once
 * that it heard a click ({heard: task_id}). A Cancel it has not heard within HEARD_MS is
 * filed in the store through the Jupyter server instead, where the run's kernel answers it
 * from a thread of its own (ui/server.py); the click, heard when the cell ends, then finds
 * the run cancelled. A Retry needs the kernel's own task function: the view says that the
 * kernel has not answered, until it does. (It may never: a page that missed a restart made
 * elsewhere sends clicks to a kernel subshell the new kernel never had, which drops them.)
 * The kernel's busy status cannot tell: a debugger or another client's request flips it to
 * idle while a cell runs.
 */
function unheard(model, action, task_id, tell, retrying) {
  let heard = false;
  if (action === "retry") retrying.add(task_id); // (a second press would retry it twice)
  const listen = (content) => {
    if (content?.heard !== task_id) return;
    heard = true;
    model.off("msg:custom", listen);
    if (retrying.delete(task_id) && action === "retry") tell(""); // (what it does, the kernel says)
  };
  model.on("msg:custom", listen);
  setTimeout(async () => {
    if (heard) return;
    if (action === "retry") {
      tell(retryWaits(task_id));
      return;
    }
    model.off("msg:custom", listen);
    const answer = await fileCancel(model, task_id);
    if (answer?.said) tell(answer.said, answer.asked); // now, not once the cell ends (w50)
  }, HEARD_MS);
}

/**
 * A Cancel filed through the server, as `capsule-nb cancel` files one, for the process
 * that runs the run to answer: one the kernel has not heard (`unheard`), or one pressed in
 * a view whose kernel is gone, of a run a live process runs. Gives the server's answer.
 */
const fileCancel = (model, task_id) =>
  askServer("cancel", { home: model.get("source")?.home ?? "", task_id }, "POST");

// A view drawn from the store asks every 5 s, but every second for a while once something is
// about to change there: its kernel has just gone (and is recording how its runs end), or a
// view on this page has filed a Cancel (FILED tells them all, not only the view that filed it).
const SOON_MS = 1000;
const [LOST_ASK_ROUNDS, FILED_ASK_ROUNDS] = [10, 30];
const FILED = "capsule-nb-filed";

const retryWaits = (task_id) => `retry of run ${task_id}: the kernel has not answered yet (a cell may be running)`;

// ------------------------------------------------------------ a live view

/**
 * What the card and the board each do around their drawing: follow the
 * kernel's clock and the kernel itself, keep the widget in a saved notebook,
 * and once the kernel is gone (or never was), `lost()` (redraw as not live)
 * and `ask()` the server for as long as it says there is more to learn.
 *
 * Returns { lead(), live(), why(), notice(), act(action, task_id), start(release) }; `act`
 * sends a click to the kernel (one it does not hear: see `unheard`), and `notice()` is what
 * the view says of the last click, as [text, done]: the kernel's `notice` (a refusal), or
 * what the view learned of a click the kernel has not heard (`told()` is called to draw it),
 * done when the server did or filed what was asked.
 * `start`, after the first draw, tells the kernel the view is shown and ticks
 * the running clocks under `el`; it returns the teardown, which says "hidden"
 * and runs `release` (the view's own listeners). Neither is sent when the
 * kernel is gone, and so never an error when a tab closes (the connection is
 * gone by the time its views are removed).
 */
export function liveView(model, el, { lost, ask, told = () => {} }) {
  ownKeys();
  let said = ""; // what the view says of a click the kernel has not heard (till the kernel says more)
  let done = false; // whether that click did what was asked (a notice, not a warning)
  const tell = (text, asked = false) => {
    [said, done] = [text, asked];
    told();
  };
  const forget = () => tell("");
  const retrying = new Set(); // runs whose Retry the kernel has not heard yet
  model.on("change:notice", forget);
  const [lead, stopClock] = kernelClock(model);
  let stopAsking = () => {};
  const askSoon = (rounds) => {
    stopAsking();
    stopAsking = keepAsking(ask, undefined, { soon: rounds, soonMs: SOON_MS });
  };
  const liveness = follow(model, () => {
    lost();
    askSoon(LOST_ASK_ROUNDS);
  });
  const onFiled = () => liveness.live() || askSoon(FILED_ASK_ROUNDS);
  window.addEventListener(FILED, onFiled);
  saveOurs(model);
  return {
    lead,
    live: liveness.live,
    why: liveness.why,
    notice: () => (said ? [said, done] : [model.get("notice"), false]),
    act: (action, task_id) => {
      if (action === "retry" && retrying.has(task_id)) return tell(retryWaits(task_id));
      said = "";
      if (liveness.send({ action, task_id })) unheard(model, action, task_id, tell, retrying);
      else if (action === "cancel") { // drawn from the store: the process that runs it answers
        fileCancel(model, task_id).then((answer) => {
          tell(!answer ? `cancel of run ${task_id}: the server did not answer`
            : answer.said || `cancel of run ${task_id}: asked of the process that runs it`, answer?.asked);
          window.dispatchEvent(new Event(FILED));
        });
      }
    },
    start(release) {
      if (!liveness.live()) askSoon(LOST_ASK_ROUNDS);
      liveness.send({ view: "shown" });
      const stopTicking = tickClocks(el, lead);
      return () => {
        model.off("change:notice", forget);
        window.removeEventListener(FILED, onFiled);
        liveness.send({ view: "hidden" });
        release();
        liveness.dispose();
        stopAsking();
        stopClock();
        stopTicking();
      };
    },
  };
}
