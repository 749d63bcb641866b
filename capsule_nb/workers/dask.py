"""``process=True`` runs on a Dask cluster (``cpsl.configure(cluster=client)``).

Same interface as ``ProcessPool``: ``run(fn, args, kwargs, *, on_message,
memory_limit, session) -> DaskJob`` with ``.pid``, ``.done()``,
``.wait(timeout)`` and ``.kill(reason)``, ending in the same ``Outcome``.

How it works:

* The call is cloudpickled here (so a notebook function goes by value) and
  submitted with ``pure=False, retries=0``: every run is a new Dask task,
  and retries are the capsule runtime's business, not Dask's. A call over
  ``SCATTER_BYTES`` (a big argument) is scattered to a worker first, so it
  is not part of the task's graph, which Dask warns about from 10 MB.
* On the Dask worker the call runs in a ``ProcessPool`` of that worker
  process (as many processes as the worker has threads). So a segfault or
  ``os._exit`` in the task fails that run as ``crashed`` and the Dask
  worker lives on (Dask would otherwise restart the worker and re-run the
  task on another one, ``allowed-failures`` times), and a kill really
  stops the task: Dask cannot stop a task running in a worker thread
  (``client.cancel(force=True)`` only forgets it; the thread runs on).
* ``kill(reason)`` asks every worker (``client.run``, no polling) to kill
  the job's child (``SIGKILL``) and to remember the id, so a task that
  was about to start returns ``killed`` at once. A job not started yet
  (no ``started`` message) ends ``killed`` at once and its future is
  cancelled; a running one ends when its task returns ``killed``, or after
  ``KILL_GRACE`` seconds without an answer (the worker is gone).
* A Dask worker that dies itself (killed, out of memory) makes Dask start
  its task again elsewhere: the second ``started`` message ends the job
  ``crashed`` and the rerun is killed, so retries stay the run's policy.
* Messages (prints, ``session.reply``/``progress``...) travel as Dask
  events (``Worker.log_event`` -> ``Client.subscribe_topic``) on one topic
  per backend; the task returns how many it sent, and the job ends only
  after all of them were delivered (or ``MESSAGE_GRACE`` passed), so
  ``on_message`` sees everything before ``wait()`` returns.

Limits: ``capsule_nb`` (and ``cloudpickle``) must be importable on the
workers; ``session.db``/``session.data`` in the child open the store by
its path, so they work only where the workers see the kernel's disk (a
``LocalCluster``, a shared filesystem). Dask worker processes are
daemonic by default and daemonic processes may not start children;
``_worker_pool`` lifts that flag in the worker process, which is safe
here because every pool worker kills itself when its parent dies.
``pid`` is the child's PID on the Dask worker's host (``worker_address``).
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections import OrderedDict
from typing import Any, Callable

from .outcome import Job, OnMessage, Outcome
from .outcome import killed as killed_outcome
from .pickling import Call, pickle_call
from .pool import ProcessJob, ProcessPool

log = logging.getLogger("capsule_nb")

KILL_GRACE = 2.0  # seconds a kill waits for the worker's answer before cancelling the future
MESSAGE_GRACE = 5.0  # seconds a finished job waits for messages still in flight
# A call bigger than this (a DataFrame passed as an argument) is scattered to a worker first and
# the task takes it by reference: inside the task's graph, Dask warns of a "large graph" from
# 10 MB on, advice the user cannot act on since capsule_nb builds the graph.
SCATTER_BYTES = 1 << 20


class DaskJob(Job):
    """One call on the cluster. Thread-safe; state changes happen on the backend's delivery thread."""

    def __init__(self, backend: "DaskBackend", on_message: OnMessage | None):
        super().__init__()  # self.pid: the child process's, on the Dask worker's host
        self._backend = backend
        self._on_message = on_message
        self.worker_address: str | None = None
        self.future: Any = None
        self._lock = threading.Lock()
        self._received = 0
        self._finishing: tuple[Outcome, int] | None = None  # (outcome, messages sent) once the task returned

    def __repr__(self) -> str:
        state = self._outcome.kind if self._outcome else "running"
        return f"<DaskJob {self.id[:8]} {state} pid={self.pid} worker={self.worker_address}>"

    def kill(self, reason: str = "killed") -> bool:
        """Stop the job: its child process is killed on the worker; the outcome is ``killed``."""
        with self._lock:
            if self._outcome is not None or self._kill_reason is not None:
                return False
            self._kill_reason = reason
        # A broadcast to the workers is a network round trip: not on the caller's thread, which may
        # hold the runtime's run lock.
        threading.Thread(target=self._broadcast_kill, name="capsule-dask-kill", daemon=True).start()
        self._backend._inbox.put(("kill", self.id, None))
        return True

    def _broadcast_kill(self) -> None:
        try:
            self._backend.client.run(_kill_on_worker, self.id, on_error="ignore")
        except Exception:
            log.exception("capsule_nb: could not reach the Dask workers to kill job %s", self.id)


def check_client(client: Any) -> None:
    """A TypeError naming ``client`` unless it is a ``distributed.Client`` (an optional extra:
    it fails here, clearly, if distributed is missing)."""
    import distributed

    if not isinstance(client, distributed.Client):
        raise TypeError(f"cluster must be a distributed.Client (or None: this machine's worker processes), "
                        f"got {client!r}")


class DaskBackend:
    """Runs pickled calls on a ``distributed.Client``'s cluster, one Dask task per call."""

    def __init__(self, client: Any):
        check_client(client)
        self.client = client
        self.topic = f"capsule-nb-{uuid.uuid4().hex}"
        self._jobs: dict[str, DaskJob] = {}
        self._jobs_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[tuple[str, str, Any]] = queue.SimpleQueue()
        self._closed = False
        self._stopped = False
        self._thread = threading.Thread(target=self._deliver, name="capsule-dask-delivery", daemon=True)
        self._thread.start()
        client.subscribe_topic(self.topic, self._on_event)

    def __repr__(self) -> str:
        return f"<DaskBackend {self.client!r} live={len(self._jobs)}>"

    def run(self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, *,
            on_message: OnMessage | None = None, memory_limit: int | None = None,
            session: Any = None) -> DaskJob:
        """As ``ProcessPool.run``; the ``started`` message also carries the Dask ``worker`` address."""
        return self.submit(pickle_call(fn, args, kwargs, session), on_message=on_message,
                           memory_limit=memory_limit)

    def submit(self, call: Call, *, on_message: OnMessage | None = None,
               memory_limit: int | None = None) -> DaskJob:
        job = DaskJob(self, on_message)
        with self._jobs_lock:  # with ``retire``'s check: a job is never added to a backend that stopped
            if self._closed:
                raise RuntimeError("this DaskBackend has been shut down")
            self._jobs[job.id] = job
        payload: Any = tuple(call)
        if len(call.function) + len(call.arguments) > SCATTER_BYTES:
            payload = self.client.scatter([payload], hash=False)[0]  # (held by the task until it ends)
        job.future = self.client.submit(
            _run_on_worker, job.id, payload, memory_limit, self.topic,
            key=f"capsule-process-{job.id}", pure=False, retries=0,
        )
        job.future.add_done_callback(lambda future: self._inbox.put(("done", job.id, future)))
        return job

    def retire(self) -> None:
        """Take no new jobs; those in flight end here as their tasks do, then it stops listening.

        For ``configure(cluster=...)`` run again, or set to None, while runs are going: they
        belong to the cluster they started on, and killing them would fail them for a change
        of where the next runs go."""
        with self._jobs_lock:
            self._closed = True
        self._stop_when_idle()

    def shutdown(self) -> None:
        """Kill the jobs still running and stop listening (the client stays open: it is the caller's)."""
        with self._jobs_lock:
            self._closed = True
            live = list(self._jobs.values())
        for job in live:
            job.kill("backend shut down")
        for job in live:
            try:
                job.wait(KILL_GRACE + 1)
            except TimeoutError:
                pass
        self._stop_when_idle()

    def _stop_when_idle(self) -> None:
        """Once closed and without jobs: unsubscribe and end the delivery thread (once)."""
        with self._jobs_lock:
            if not self._closed or self._jobs or self._stopped:
                return
            self._stopped = True
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:
            pass
        self._inbox.put(("stop", "", None))

    # ------------------------------------------------------------- internals

    def _on_event(self, event: tuple[float, dict]) -> None:
        """On the client's loop: only queue it (``on_message`` may be slow)."""
        message = event[1]
        self._inbox.put(("msg", message["job"], message))

    def _deliver(self) -> None:
        """The one thread that changes jobs: messages, task results, kill deadlines."""
        while True:
            what, job_id, detail = self._inbox.get()
            if what == "stop":
                return
            with self._jobs_lock:
                job = self._jobs.get(job_id)
            if job is None:
                continue
            try:
                if what == "msg":
                    self._message(job, detail)
                elif what == "done":
                    self._task_done(job, detail)
                elif what == "kill":
                    self._killing(job)
                elif what in ("give-up", "late"):
                    self._give_up(job, what)
            except Exception:
                log.exception("capsule_nb: handling %s for Dask job %s failed", what, job_id)

    def _message(self, job: DaskJob, message: dict) -> None:
        kind, data = message["kind"], message["data"]
        if kind == "started" and job.pid is not None:
            self._started_again(job, data)
            return
        if kind == "started":
            job.pid, job.worker_address = data.get("pid"), data.get("worker")
        job._received += 1
        if job._on_message is not None:
            try:
                job._on_message(kind, data)
            except Exception:
                log.exception("capsule_nb: on_message failed for a Dask job message %r", kind)
        if job._finishing is not None and job._received >= job._finishing[1]:
            self._settle(job, job._finishing[0])

    def _started_again(self, job: DaskJob, data: dict) -> None:
        """Dask runs a task again when the worker running it dies (``allowed-failures`` times):
        a second attempt that the run's retry policy never granted, counted as one (w59: a run
        of ``retries=0`` ended completed, attempt 2 of 1). The attempt ends as a crash, as one
        whose local worker died does, and the rerun is killed where it started."""
        message = (f"worker process died: the Dask worker {job.worker_address} running it was lost, and Dask "
                   f"started it again on {data.get('worker')}, which was stopped: a run is retried by its "
                   f"own policy only")
        threading.Thread(target=job._broadcast_kill, name="capsule-dask-kill", daemon=True).start()
        if job.future is not None:
            job.future.cancel()
        self._settle(job, Outcome("crashed", error_type="WorkerCrashed", message=message))

    def _task_done(self, job: DaskJob, future: Any) -> None:
        status = future.status
        if status == "finished":
            outcome, sent = future.result()
        elif status == "cancelled":
            outcome, sent = killed_outcome(job.pid, job._kill_reason or "the Dask task was cancelled"), 0
        else:
            exc = future.exception()
            message = f"the Dask task failed: {type(exc).__name__}: {exc}"
            outcome = Outcome("crashed", error_type="WorkerCrashed", message=message, exception=exc)
            sent = 0
        if job._received >= sent:
            self._settle(job, outcome)
            return
        job._finishing = (outcome, sent)
        timer = threading.Timer(MESSAGE_GRACE, self._inbox.put, args=(("late", job.id, None),))
        timer.daemon = True
        timer.start()

    def _killing(self, job: DaskJob) -> None:
        if job._outcome is not None or job._finishing is not None:
            return
        if job.pid is None:  # not started on a worker: drop it from Dask's queue and be done
            job.future.cancel()
            self._settle(job, killed_outcome(None, job._kill_reason or "killed"))
            return
        timer = threading.Timer(KILL_GRACE, self._inbox.put, args=(("give-up", job.id, None),))
        timer.daemon = True
        timer.start()

    def _give_up(self, job: DaskJob, why: str) -> None:
        if job._outcome is not None:
            return
        if why == "late" and job._finishing is not None:
            log.warning("capsule_nb: Dask job %s ended with %d of %d messages delivered",
                        job.id, job._received, job._finishing[1])
            self._settle(job, job._finishing[0])
        elif why == "give-up" and job._finishing is None:
            job.future.cancel()  # the worker did not answer the kill: forget the task
            self._settle(job, killed_outcome(job.pid, job._kill_reason or "killed"))

    def _settle(self, job: DaskJob, outcome: Outcome) -> None:
        with job._lock:
            if not job._finish(outcome):
                return
        with self._jobs_lock:
            self._jobs.pop(job.id, None)
        job.future = None  # lets Dask drop the result
        job._run_callbacks()
        self._stop_when_idle()  # a retired backend goes with its last job


# --------------------------------------------------------------------------- #
# On the Dask worker
# --------------------------------------------------------------------------- #

_pools: dict[str, ProcessPool] = {}
_live: dict[str, ProcessJob] = {}  # this worker process's running jobs, by id
_killed_ids: OrderedDict[str, None] = OrderedDict()  # ids killed lately (a queued task may start later)
_lock = threading.Lock()


def _worker_pool(worker: Any) -> ProcessPool:
    """This Dask worker's ProcessPool (one per worker, as many processes as it has threads); caller holds _lock."""
    import multiprocessing

    pool = _pools.get(worker.address)
    if pool is None:
        # Dask workers are daemonic, and daemonic processes may not start children. Our
        # children watch this process and kill themselves when it dies, so none is orphaned.
        multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
        pool = _pools[worker.address] = ProcessPool(max(1, worker.state.nthreads))
    return pool


def _kill_on_worker(job_id: str) -> bool:
    """Run by ``client.run`` on every worker: kill the job if it runs here, and remember it did."""
    with _lock:
        _killed_ids[job_id] = None
        while len(_killed_ids) > 10_000:
            _killed_ids.popitem(last=False)
        job = _live.get(job_id)
    return job.kill("killed") if job is not None else False


def _run_on_worker(job_id: str, call: tuple[bytes, bytes], memory_limit: int | None, topic: str) -> tuple[Outcome, int]:
    """The Dask task: run the call in a child process; return ``(outcome, messages sent)``."""
    from distributed import get_worker

    worker = get_worker()
    sent = 0

    def forward(kind: str, data: dict) -> None:  # called in order, from one pool thread
        nonlocal sent
        if kind == "started":
            data = dict(data, worker=worker.address)
        worker.log_event(topic, {"job": job_id, "kind": kind, "data": data})
        sent += 1

    with _lock:
        if job_id in _killed_ids:  # killed while it was queued
            return killed_outcome(None, "killed"), 0
        job = _live[job_id] = _worker_pool(worker).submit(
            Call(*call), on_message=forward, memory_limit=memory_limit)
    try:
        outcome = job.wait()
    finally:
        with _lock:
            _live.pop(job_id, None)
    return outcome, sent
