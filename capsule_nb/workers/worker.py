"""The parent's handle on one worker process: start it, hand it a job, kill it, and read
what it sent. The pool decides what each worker does; the listener reads them all."""

from __future__ import annotations

import multiprocessing.connection
import os
import pickle
import signal
import threading
from typing import TYPE_CHECKING

from .child import worker_main
from .forkserver import CONTEXT, starting

if TYPE_CHECKING:
    from .pool import ProcessJob


_SMALL = 1 << 20  # a job this big or bigger goes through ``Connection.send_bytes``


class Worker:
    """One worker process, as its pool and its listener see it."""

    def __init__(self) -> None:
        self.conn, child_conn = CONTEXT.Pipe()
        self.faults, child_faults = CONTEXT.Pipe(duplex=False)
        self.process = CONTEXT.Process(
            target=worker_main, args=(child_conn, child_faults, os.getpid()),
            name="capsule-process-worker", daemon=False,  # not daemonic: its tasks may start processes
        )
        starting.worker = True
        try:
            self.process.start()
        finally:
            starting.worker = False
        child_conn.close()
        child_faults.close()
        self.pid: int = self.process.pid  # type: ignore[assignment]
        self.ready = False
        self.job: ProcessJob | None = None
        self.doomed = False  # killed, or asked to go: never handed another job
        self.frames = Frames(self.conn.fileno())
        self.gone = threading.Event()  # set once the listener has reaped it and settled its job

    def send_job(self, job: ProcessJob) -> None:
        call = job._call
        assert call is not None
        data = pickle.dumps(("job", job.id, call.function, call.arguments, job.memory_limit, call.kept), protocol=5)
        try:
            if len(data) < _SMALL:  # framed as ``send_bytes`` does, in one write, without its layers
                fd = self.conn.fileno()  # (OSError once the listener closed it, before its number can name another file)
                view = memoryview(len(data).to_bytes(4, "big") + data)
                while view:
                    view = view[os.write(fd, view):]
            else:
                self.conn.send_bytes(data)
        except (OSError, ValueError):
            pass  # it died meanwhile: the listener sees that and settles the job

    def kill(self) -> None:
        """SIGKILL the worker's process group (it leads one once it is ready), else the worker."""
        self.doomed = True
        for send in (os.killpg, os.kill):
            try:
                send(self.pid, signal.SIGKILL)
                return
            except ProcessLookupError:  # no such group (yet): try the process itself
                continue

    def outlived_forkserver(self) -> int | None:
        """A pidfd on this worker if it lives on although its sentinel closed, else None.

        The sentinel is the forkserver's status pipe, which also closes, with no status
        (multiprocessing's exit code 255), when the forkserver dies first: ipykernel ends the
        children in its own process group at a shutdown or restart, the forkserver among
        them, but not a worker, which leads a group of its own and still runs its job."""
        self.process.join()
        if self.process.exitcode != 255:
            return None
        try:
            return os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # gone as well (or no pidfd): dead, as before
            return None

    def crash_dump(self) -> str:
        """What faulthandler wrote to the fault pipe (the worker is dead: nothing more comes)."""
        return read_available(self.faults)

    def close(self) -> None:
        self.conn.close()
        self.faults.close()


class Frames:
    """What a worker sent with ``Connection.send_bytes`` (a 4-byte big-endian length, or -1 and
    an 8-byte one, then the bytes), read with one ``os.read`` for whatever has arrived, where
    ``recv_bytes`` makes two reads per message. Each read gives the GIL away and waits to get
    it back, behind the loop and the submitting thread: fewer reads, fewer such waits."""

    def __init__(self, fd: int):
        self._fd = fd
        self._buffer = bytearray()
        self._wanted = 1 << 16  # what the next read asks for: more when a big message is coming

    def read(self) -> list[bytes]:
        """The messages complete after one read (maybe none yet); ``EOFError`` at the end."""
        chunk = os.read(self._fd, self._wanted)
        if not chunk:
            raise EOFError
        buffer = self._buffer
        if not buffer and len(chunk) >= 4 and int.from_bytes(chunk[:4], "big", signed=True) == len(chunk) - 4:
            return [chunk[4:]]  # most reads: one whole message
        buffer += chunk
        messages, start, end = [], 0, len(buffer)
        while end - start >= 4:
            size, head = int.from_bytes(buffer[start : start + 4], "big", signed=True), 4
            if size == -1:  # (over 2 GiB)
                if end - start < 12:
                    break
                size, head = int.from_bytes(buffer[start + 4 : start + 12], "big"), 12
            if end - start - head < size:
                self._wanted = max(1 << 16, size + head - (end - start))
                break
            messages.append(bytes(buffer[start + head : start + head + size]))
            start += head + size
        else:
            self._wanted = 1 << 16
        del buffer[:start]
        return messages


def read_available(conn: multiprocessing.connection.Connection) -> str:
    """What has been written to ``conn``'s pipe, without blocking."""
    fd = conn.fileno()
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")
