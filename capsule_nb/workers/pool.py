"""Worker processes for ``process=True`` runs: crash-isolated, killable, reused.

Why our own small supervisor, over ``multiprocessing``'s forkserver context:

* **Functions from notebook cells.** The call ``(fn, args, kwargs)`` travels
  as cloudpickle bytes, so a function defined in a cell (``__main__``), its
  closures and the notebook globals it uses go by value. The standard
  pools pickle ``fn`` by reference, which cannot find a notebook function.
* **Not fork.** A kernel runs threads (ours, ipykernel's, the store
  writer); forking it copies locks held by other threads and can deadlock
  the child. ``forkserver`` forks workers from a small, single-threaded
  server started once (with ``capsule_nb.workers.child`` preloaded), so a
  worker starts in milliseconds without inheriting the kernel's state.
* **Kill one task.** ``ProcessPoolExecutor`` and ``multiprocessing.Pool``
  cannot stop one running call: a timeout or cancel must kill exactly the
  process running it, and a crash must fail exactly that run while the
  pool carries on. Here each worker runs one job at a time, so
  ``ProcessJob.kill`` is a ``SIGKILL`` to that worker's process group
  (each worker calls ``setsid``, so whatever it started dies with it and a
  kernel interrupt, sent to the kernel's group, never reaches it).
* **Reuse.** Workers start lazily, up to ``max_workers``, and stay for the
  next job; a worker that died or was killed is replaced when needed.

One job per worker: the parent sends ``("job", id, function, arguments, memory_limit)``
over a ``Pipe``; the worker answers with ``("msg", id, kind, data)`` for
prints and session calls, then ``("done", id, kind, data, leaving)``. One
listener thread (``listener.py``) reads every worker of the pool, forwards
messages to the job's ``on_message`` and settles the job; a worker's death
settles a job still in flight as crashed or killed.

What happens inside the worker is ``child.py``; the parent's handle on one is
``worker.py``.

Limits, on purpose: worker state persists between jobs (module globals, a
``sys.path`` change, leftover threads), as in any reused worker; the memory
limit is on address space (``RLIMIT_AS``), counted on top of the idle
worker's; a worker whose parent dies kills itself (``pidfd`` watch). The
first worker of a process pays the forkserver's start and its import of
capsule_nb (a few hundred ms, mostly the UI's imports): ``warm()`` hides it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Any, Callable

from ..checks import whole_number
from .forkserver import install_hooks, may_start_children, pools
from .listener import Listener
from .outcome import CRASHED, SHUT_DOWN, Job, OnMessage, Outcome, WorkerCrashed, crashed, killed, outcome_from
from .pickling import Call, pickle_call
from .worker import Worker

log = logging.getLogger("capsule_nb")


class ProcessJob(Job):
    """One call running (or queued) in a worker process. Thread-safe."""

    def __init__(self, pool: "ProcessPool", call: Call | None, on_message: OnMessage | None,
                 memory_limit: int | None):
        super().__init__()
        self._pool = pool
        self._call = call
        self._on_message = on_message
        self.memory_limit = memory_limit  # self.pid: the worker's, once the job is handed to one
        self._worker: Worker | None = None

    def __repr__(self) -> str:
        state = self._outcome.kind if self._outcome else ("running" if self.pid else "queued")
        return f"<ProcessJob {self.id[:8]} {state} pid={self.pid}>"

    def kill(self, reason: str = "killed") -> bool:
        """``SIGKILL`` the worker running this job (or drop it from the queue).

        Returns False if the job had already ended. Otherwise the outcome will
        be ``killed`` with ``reason``, and ``wait()`` returns once the worker's
        PID is gone.
        """
        return self._pool._kill(self, reason)

    def _deliver(self, kind: str, data: dict) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(kind, data)
        except Exception:  # a broken forwarder must not break the pool
            log.exception("capsule_nb: on_message failed for a process job message %r", kind)

    def _settle(self, outcome: Outcome) -> None:
        """Caller holds the pool lock; the pool runs the done callbacks once it lets go of it.
        A job without any has nothing to run (a callback added from now on runs at once)."""
        self._call = None
        self._worker = None
        if self._finish(outcome) and self._callbacks is not None:
            self._pool._ended.append(self)


class ProcessPool:
    """Reused worker processes, one job at a time each. Every method is thread-safe.

    ``run`` returns a ``ProcessJob`` at once; the job waits in a queue when
    all ``max_workers`` workers are busy. Workers start lazily and stay.
    """

    def __init__(self, max_workers: int | None = None):
        self.max_workers = whole_number("max_workers", (os.cpu_count() or 1) if max_workers is None else max_workers,
                                        minimum=1)
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._workers: set[Worker] = set()
        self._idle: list[Worker] = []  # LIFO: the warmest worker takes the next job
        self._queue: deque[ProcessJob] = deque()
        self._starting = 0
        self._closed = False
        self._ended: list[ProcessJob] = []  # settled under the lock, callbacks still to run
        self._listener = Listener(self)
        install_hooks()
        pools.add(self)

    def __repr__(self) -> str:
        with self._lock:
            busy = sum(1 for w in self._workers if w.job is not None)
            return (f"<ProcessPool workers={len(self._workers)}/{self.max_workers} busy={busy} "
                    f"queued={len(self._queue)}>")

    def run(self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None, *,
            on_message: OnMessage | None = None, memory_limit: int | None = None,
            session: Any = None, session_param: str | None = None) -> ProcessJob:
        """Run ``fn(*args, **kwargs)`` in a worker; ``TypeError`` (naming the value) if it cannot be pickled.

        ``on_message(kind, data)`` is called, in order, from a pool thread:
        ``("started", {"pid"})`` when a worker takes the job, then for what
        the task does: ``("capture", {"stream", "text"})``,
        ``("message", {"id", "kind", "text", "extra"})``,
        ``("extend", {"id", "text"})``, ``("end", {"id"})``, ``("progress", {"done", "total",
        "message"})``, ``("show", {"task_id", "message"})``; all of them before
        ``wait()`` returns. ``forward_to(run)`` turns these into calls on a
        runtime ``Run``; the runtime hands ``show`` to the run's session.

        ``memory_limit`` (bytes): address space the job may add to the idle
        worker's; going over it raises ``MemoryError`` in the task (or, in
        code that does not check, kills the worker); either way the run fails
        saying so. ``session`` is bound as the session in the child, and
        given to the parameter ``session_param`` when one is named.
        """
        return self.submit(pickle_call(fn, args, kwargs, session, session_param), on_message=on_message,
                           memory_limit=memory_limit)

    def submit(self, call: Call, *, on_message: OnMessage | None = None,
               memory_limit: int | None = None) -> ProcessJob:
        """``run`` for a call already pickled with ``pickle_call``."""
        if memory_limit is not None:
            whole_number("memory_limit (bytes)", memory_limit, minimum=1)
        job = ProcessJob(self, call, on_message, memory_limit)
        with self._lock:
            if self._closed:
                raise RuntimeError("this ProcessPool has been shut down")
            self._queue.append(job)
            full = not self._idle and len(self._workers) + self._starting >= self.max_workers
        if not full:  # else the next worker to free up takes it (``_handle``, ``_died``)
            self._dispatch()
        return job

    def warm(self, workers: int = 1) -> None:
        """Start up to ``workers`` idle workers in the background (no waiting).

        The first worker of a kernel costs a forkserver start plus importing
        capsule_nb there (a few hundred ms); call this when a ``process=True``
        task is defined so that the first submit finds a worker ready.

        Only a hint, so it does nothing where this process may not start
        children: a daemonic process (a Dask worker importing a script's
        ``__main__`` to start up) or one still bootstrapping. A submit there
        would fail its run, saying why; a warm-up says nothing.
        """
        if not may_start_children():
            return
        with self._lock:
            if self._closed:
                return
            slots = sum(1 for w in self._workers if w.ready) + self._starting
            count = max(0, min(workers, self.max_workers) - slots)
            self._starting += count
        if count:
            threading.Thread(target=lambda: [self._start_worker() for _ in range(count)],
                             name="capsule-process-warm", daemon=True).start()

    # ------------------------------------------------------------- internals

    def _dispatch(self) -> None:
        """Hand queued jobs to idle workers; start workers for the rest (up to max_workers)."""
        handed: list[tuple[Worker, ProcessJob]] = []
        with self._lock:
            while self._queue and self._idle:
                worker, job = self._idle.pop(), self._queue.popleft()
                worker.job, job._worker, job.pid = job, worker, worker.pid
                handed.append((worker, job))
            to_start = 0
            if not self._closed:
                slots = sum(1 for w in self._workers if w.ready) + self._starting  # processes, up or coming
                to_start = max(0, min(len(self._queue) - self._starting, self.max_workers - slots))
                self._starting += to_start
        for worker, job in handed:
            job._deliver("started", {"pid": worker.pid})
            worker.send_job(job)
        if to_start:  # a process start takes milliseconds: never on the submitting thread
            threading.Thread(target=lambda: [self._start_worker() for _ in range(to_start)],
                             name="capsule-process-start", daemon=True).start()
        self._notify()

    def _notify(self) -> None:
        """Run the done callbacks of the jobs settled meanwhile (outside the lock, since a
        callback may submit the next job)."""
        if not self._ended:  # whoever settles a job calls this after; most calls find none
            return
        with self._lock:
            ended, self._ended = self._ended, []
        for job in ended:
            job._run_callbacks()

    def _start_worker(self) -> None:
        try:
            with self._start_lock:  # Process.start is not meant to be raced (and ``shutdown`` waits for it)
                if self._closed:
                    raise RuntimeError("the pool was shut down first")
                worker = Worker()
        except Exception as exc:  # (after a shutdown, at exit, the forkserver may be gone first: no news)
            log.log(logging.DEBUG if self._closed else logging.ERROR, "capsule_nb: could not start a worker process",
                    exc_info=True)
            with self._lock:
                self._starting -= 1
                job = self._queue.popleft() if self._queue and not self._workers else None
                if job is not None:
                    message = f"could not start a worker process: {type(exc).__name__}: {exc}"
                    if isinstance(exc, EOFError):  # the forkserver died, e.g. importing capsule_nb failed
                        message += " (the forkserver exited; its error went to the kernel's stderr)"
                    job._settle(Outcome(CRASHED, error_type="WorkerCrashed", message=message,
                                        exception=WorkerCrashed(message)))
            self._notify()
            return
        with self._lock:
            self._workers.add(worker)
            if self._closed:
                worker.kill()
        self._listener.watch(worker)  # after it is in _workers, so its death is always seen there

    def _handle(self, worker: Worker, message: tuple) -> None:
        """A message from ``worker`` (on the listener's thread, which runs the done callbacks
        of the jobs it settles once it has read everything that arrived)."""
        tag = message[0]
        if tag == "ready":
            with self._lock:
                self._starting -= 1
                worker.ready = True
                if not worker.doomed:
                    self._idle.append(worker)
            self._dispatch()
            return
        job = worker.job
        if job is None or message[1] != job.id:
            return  # a late word about a job that already ended (killed meanwhile)
        if tag == "msg":
            job._deliver(message[2], message[3])
        elif tag == "done":
            self._done(worker, job, outcome_from(message[2], message[3], worker.pid), message[4])

    def _done(self, worker: Worker, job: ProcessJob, outcome: Outcome, leaving: bool) -> None:
        """``worker`` has finished ``job``: it takes the next queued job at once, with one taking
        of the lock for all of it (the idle list and ``_dispatch`` are for what this cannot do).
        The job is sent before its start is told: the listener, which tells it, reads what
        the worker says about it only afterwards."""
        following = None
        with self._lock:
            if worker.job is not job:
                return
            worker.job = None
            job._settle(outcome)
            if leaving:
                worker.doomed = True  # it exits by itself; the listener then removes it
            elif not worker.doomed and not self._closed:
                if self._queue:
                    following = self._queue.popleft()
                    worker.job, following._worker, following.pid = following, worker, worker.pid
                else:
                    self._idle.append(worker)
            more = bool(self._queue) and (bool(self._idle) or len(self._workers) < self.max_workers)
        if following is not None:
            worker.send_job(following)
            following._deliver("started", {"pid": worker.pid})
        if more or leaving:  # a worker to start, or (a race) one idle while jobs wait
            self._dispatch()

    def _died(self, worker: Worker, exitcode: int | None, dump: str) -> None:
        """``worker``'s process is gone (and reaped); settle its job, if it had one."""
        with self._lock:
            self._workers.discard(worker)
            if worker in self._idle:
                self._idle.remove(worker)
            if not worker.ready:
                self._starting -= 1
            job, worker.job = worker.job, None
            if job is not None:
                job._settle(crashed(worker.pid, exitcode, dump, job.memory_limit))
            elif not worker.ready and self._queue and not self._closed:
                # it never came up: fail one waiting job with why, so a broken setup cannot loop for ever
                failed = self._queue.popleft()
                failed._settle(crashed(None, exitcode, dump, None, prefix="could not start a worker: "))
        self._dispatch()

    def _kill(self, job: ProcessJob, reason: str) -> bool:
        with self._lock:
            if job._outcome is not None or job._kill_reason is not None:
                return False
            job._kill_reason = reason
            if job in self._queue:
                self._queue.remove(job)
                job._settle(killed(None, reason))
            elif job._worker is not None:
                job._worker.kill()  # under the lock: the worker cannot have moved on to another job
        # Not on this thread: whoever kills may hold a lock that the job's done callback takes
        # (the runtime cancels a run holding the run's lock).
        threading.Thread(target=self._notify, name="capsule-process-killed", daemon=True).start()
        return True

    def shutdown(self, wait: bool = True) -> None:
        """Kill every worker (running jobs end ``killed``, queued ones too); ``run`` raises after."""
        with self._lock:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            for job in queued:
                job._kill_reason = SHUT_DOWN
                job._settle(killed(None, SHUT_DOWN))
            workers = list(self._workers)
            for worker in workers:
                if worker.job is not None and worker.job._kill_reason is None:
                    worker.job._kill_reason = SHUT_DOWN
                worker.kill()
        self._notify()
        with self._start_lock:  # a worker starting now starts whole and is killed: cut off, it prints EOFError
            pass
        if wait and not self._listener.on_thread():  # (a done callback shutting the pool down cannot wait for itself)
            for worker in workers:
                worker.gone.wait(timeout=5)

    def __enter__(self) -> "ProcessPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
