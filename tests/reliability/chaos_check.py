"""The chaos campaign's checker: the histories, the journals and the store against the promises.

Every invariant counts what it checked and lists what broke it. The store is read through a
``Store`` of the conductor's own (no App, so the conductor never recovers or adopts anything
itself: what the checker sees is what the workers did).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

from chaos import CANCELABLE, CHILD_GRACE, process_start, read_journal, read_journals

from capsule_nb.record import FINISHED
from capsule_nb.store.owners import owner_alive

TICK_PERIOD = 2  # seconds, as chaos.TICK says
ALIVE_BEFORE = 1.0  # a process "alive for the whole tick" was ready this long before it
ALIVE_AFTER = 3.0  # ... and lived this long after it (time to claim, record and start the run)
CANCEL_SLACK = 3.0  # a run asked to stop may still end otherwise if it ended within this of the ask
RECOVERY_SECONDS = 60.0  # after the load stops, how long recovery and the drain may take

INVARIANTS = {
    "submits": "every acknowledged submit is in the store",
    "results": "every completed run's result is readable (and is what a process saw)",
    "locks": "no two runs overlapped on one lock key",
    "tick_once": "each cron tick ran at most once",
    "tick_ran": "each cron tick ran while some process was alive for the whole tick",
    "inc": "the $inc total equals the acknowledged increments",
    "dead_owner": "after recovery no run is unfinished with a dead owner",
    "drained": "every run finishes once the load stops",
    "cancel": "every cancel that returned True ended its run",
    "children": "no worker process outlives its parent",
}


class Report:
    def __init__(self) -> None:
        self.checked: Counter[str] = Counter()
        self.broken: dict[str, list] = defaultdict(list)
        self.figures: dict[str, object] = {}

    def expect(self, invariant: str, ok: bool, detail: object) -> None:
        self.checked[invariant] += 1
        if not ok:
            self.broken[invariant].append(detail)

    def violations(self) -> int:
        return sum(len(v) for v in self.broken.values())

    def children_after_exit(self, out: Path) -> None:
        """Once every worker has exited, none of the process-run workers they used is alive."""
        seen = {(e["pid"], e["start"]) for e in read_journals(out / "children") if "pid" in e}
        deadline = time.monotonic() + CHILD_GRACE
        alive = seen
        while alive and time.monotonic() < deadline:
            alive = {(pid, start) for pid, start in alive if process_start(pid) == start}
            time.sleep(0.05)
        for pid, start in seen:
            self.expect("children", (pid, start) not in alive, f"process-run worker {pid} outlived every worker")
        self.figures["process-run workers seen"] = len(seen)

    def summary(self) -> dict:
        return {"figures": self.figures,
                "invariants": {name: {"checked": self.checked[name], "violations": len(self.broken[name]),
                                      "examples": [str(x) for x in self.broken[name][:5]]}
                               for name in INVARIANTS}}

    def text(self) -> str:
        lines = [f"{name}: {value}" for name, value in self.figures.items()]
        lines.append(f"{'invariant':<74} {'checked':>8} {'violations':>10}")
        for name, what in INVARIANTS.items():
            lines.append(f"{what:<74} {self.checked[name]:>8} {len(self.broken[name]):>10}")
            lines += [f"    {example}" for example in self.broken[name][:5]]
        lines.append(f"violations: {self.violations()}")
        return "\n".join(lines)


def check(out: Path, store, conductor) -> Report:
    report = Report()
    history = read_journals(out / "history")
    ops = Counter(e["op"] for e in history)
    kills = read_journal(out / "kills.jsonl")
    runs = _settled(store, conductor.t1)
    report.figures.update({
        "seconds of load": round(conductor.t1 - conductor.t0, 1),
        "kills": len(kills),
        "worker starts": conductor.started,
        "operations": sum(n for op, n in ops.items() if op not in ("ready", "idle")),
        "by kind": dict(sorted(ops.items())),
        "runs in the store": len(runs),
        "runs by status": dict(Counter(r["status"] for r in runs.values())),
    })
    _submits(report, history, runs)
    _results(report, history, runs, store)
    _locks(report, read_journals(out / "spans"))
    _ticks(report, history, kills, runs, conductor, store)
    _increments(report, history, store)
    _owners(report, runs)
    _cancels(report, history, runs)
    for survivor in conductor.survivors:
        outlived = survivor["outlived"]
        report.expect("children", outlived is not None and outlived <= CHILD_GRACE,
                      f"{survivor['pid']} outlived its killed ancestor {survivor['parent']} by "
                      f"{'more than 10 s' if outlived is None else f'{outlived:.2f}s'}")
    latencies = [s["outlived"] for s in conductor.survivors if s["outlived"] is not None]
    report.figures["descendants of killed processes"] = len(conductor.survivors)
    report.figures["slowest of them to die (s)"] = round(max(latencies, default=0.0), 3)
    return report


def _settled(store, t1: float) -> dict[str, dict]:
    """The runs once recovery has had its time: no unfinished run with a dead owner, and
    nothing but cron ticks still going (or the deadline passed: the checks say what is left)."""
    deadline = time.monotonic() + RECOVERY_SECONDS

    def unsettled() -> list[dict]:
        store.poll()
        return [r for r in store.unfinished_runs() if r["app"] == "chaos" and (
            not owner_alive(r.get("owner", "")) or r["task_name"] != "chaos_tick")]

    while unsettled() and time.monotonic() < deadline:
        time.sleep(0.2)
    return {r["task_id"]: r for r in store.runs() if r["app"] == "chaos"}


def _submits(report: Report, history: list[dict], runs: dict) -> None:
    for entry in history:
        if entry["op"] == "submit":
            report.expect("submits", entry["id"] in runs, f"{entry['task']} {entry['id']} acknowledged, not stored")


def _results(report: Report, history: list[dict], runs: dict, store) -> None:
    loaded: dict[str, str] = {}
    for record in runs.values():
        if record["status"] != "completed":
            continue
        try:
            kind = record.get("result_kind")
            if kind == "payload":
                value = store.get_payload(record["task_id"], "result")
            elif kind == "json":
                value = record["result"]
            else:
                raise ValueError(f"result not kept ({kind}): {record.get('result_note')}")
            loaded[record["task_id"]] = repr(value)
            report.expect("results", True, None)
        except Exception as exc:
            report.expect("results", False, f"{record['task_name']} {record['task_id']}: {exc}")
    for entry in history:
        if entry["op"] != "finished":
            continue
        record = runs.get(entry["id"])
        status = record and record["status"]
        report.expect("results", status == entry["status"],
                      f"{entry['id']} was seen {entry['status']}, the store says {status}")
        if entry["status"] == "completed" and entry["id"] in loaded:
            report.expect("results", loaded[entry["id"]] == entry["result"],
                          f"{entry['id']} returned {entry['result']}, the store has {loaded[entry['id']]}")


def _locks(report: Report, beats: list[dict]) -> None:
    spans: dict[str, list] = {}
    for beat in beats:
        if "run" in beat:
            span = spans.setdefault(beat["run"], [beat["key"], beat["t"], beat["t"]])
            span[1], span[2] = min(span[1], beat["t"]), max(span[2], beat["t"])
    by_key: dict[str, list] = defaultdict(list)
    for token, (key, start, end) in spans.items():
        by_key[key].append((start, end, token))
    for key, items in by_key.items():
        items.sort()
        last_end, last = float("-inf"), None
        for start, end, token in items:
            report.expect("locks", start >= last_end,
                          f"{key}: run {token[:8]} started {last_end - start:.3f}s before {last and last[:8]} ended")
            if end > last_end:
                last_end, last = end, token
    report.figures["lock spans"] = len(spans)


def _ticks(report: Report, history: list[dict], kills: list[dict], runs: dict, conductor, store) -> None:
    killed = {k["pid"]: k["at"] for k in kills}
    lives = [(e["at"], killed.get(e["pid"], float("inf"))) for e in history if e["op"] == "ready"]
    ticks: dict[int, list] = defaultdict(list)
    for record in runs.values():
        if record["task_name"] == "chaos_tick":
            ticks[round(record["scheduled_for"])].append(record)
    for due, records in ticks.items():
        report.expect("tick_once", len(records) == 1 and records[0]["attempt"] <= 1,
                      f"tick {due}: {len(records)} runs, attempts {[r['attempt'] for r in records]}")
    first = int(conductor.t0) + TICK_PERIOD - int(conductor.t0) % TICK_PERIOD
    covered = 0
    for due in range(first, int(conductor.t1 - ALIVE_AFTER), TICK_PERIOD):
        if any(ready <= due - ALIVE_BEFORE and end >= due + ALIVE_AFTER for ready, end in lives):
            covered += 1
            ran = [r for r in ticks.get(due, []) if r["attempt"] >= 1]
            report.expect("tick_ran", bool(ran), f"tick {due} ({time.strftime('%H:%M:%S', time.gmtime(due))} UTC): "
                                                 f"{[r['status'] for r in ticks.get(due, [])] or 'no run'}")
    state = store.get("sched/chaos/chaos_tick") or {}
    report.figures["ticks with a process alive throughout"] = covered
    report.figures["ticks skipped (previous run unfinished)"] = state.get("skipped", 0)


def _increments(report: Report, history: list[dict], store) -> None:
    doc = next((d for d in store.docs("chaos") if d["_id"] == "total"), {})
    intents: dict[str, dict[int, int]] = defaultdict(dict)
    acked: dict[str, set[int]] = defaultdict(set)
    for entry in history:
        if entry["op"] == "inc_intent":
            intents[entry["inc"]][entry["seq"]] = entry["k"]
        elif entry["op"] == "inc":
            acked[entry["inc"]].add(entry["seq"])
    by = doc.get("by", {})
    for inc_id in set(intents) | set(by):
        applied = by.get(inc_id, {"n": 0, "last": 0})
        wanted = intents.get(inc_id, {})
        expected = sum(k for seq, k in wanted.items() if seq <= applied["last"])
        report.expect("inc", applied["n"] == expected and applied["last"] <= max(wanted, default=0)
                      and all(seq <= applied["last"] for seq in acked[inc_id]),
                      f"{inc_id}: applied {applied}, acknowledged up to {max(acked[inc_id], default=0)}, "
                      f"intended {len(wanted)}")
    acknowledged = sum(intents[i][s] for i in acked for s in acked[i])
    total = doc.get("total")
    in_flight = sum(v["n"] for v in by.values()) - acknowledged
    report.expect("inc", total == sum(v["n"] for v in by.values()),
                  f"total {total} != the sum per process {sum(v['n'] for v in by.values())}")
    report.figures["$inc total / acknowledged / applied by a call a kill cut short"] = (total, acknowledged, in_flight)


def _owners(report: Report, runs: dict) -> None:
    """Every run, once the load stopped and recovery had its time: finished, or owned by a
    live process (and then only a cron tick may still be going)."""
    for record in runs.values():
        finished = record["status"] in FINISHED
        alive = finished or owner_alive(record.get("owner", ""))
        report.expect("dead_owner", alive, f"{record['task_name']} {record['task_id']} {record['status']}, "
                                           f"owner {record.get('owner')} dead")
        report.expect("drained", finished or not alive or record["task_name"] == "chaos_tick",
                      f"{record['task_name']} {record['task_id']} still {record['status']}")
    report.figures["runs a kill interrupted (retried / failed)"] = (
        sum(1 for r in runs.values() if r["attempt"] > 1),
        sum(1 for r in runs.values() if r["status"] == "failed" and r.get("error") == "interrupted"))


def _cancels(report: Report, history: list[dict], runs: dict) -> None:
    latencies = []
    for entry in history:
        if entry["op"] != "cancel" or not entry["asked"]:
            continue
        record = runs.get(entry["id"], {})
        status, ended = record.get("status"), record.get("completed_at")
        ok = status == "cancelled" or (status in FINISHED and ended is not None and ended <= entry["at"] + CANCEL_SLACK)
        report.expect("cancel", ok and record.get("task_name") in CANCELABLE,
                      f"{record.get('task_name')} {entry['id']} asked to stop at {entry['at']:.2f}, "
                      f"ended {status} at {ended}")
        if status == "cancelled" and ended is not None:
            latencies.append(ended - entry["at"])
    report.figures["slowest cancel (s)"] = round(max(latencies, default=0.0), 3)
