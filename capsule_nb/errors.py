"""The exceptions a user catches. Kept apart so every module can raise them
without importing the runtime."""

from __future__ import annotations


class CapsuleError(Exception):
    """Base class of capsule_nb's own errors."""


class LockedError(CapsuleError):
    """A submit with ``on_lock="reject"`` found its lock key taken."""

    def __init__(self, key: str, holder: str | None = None):
        self.key = key
        self.holder = holder
        held = f" by run {holder}" if holder else ""
        super().__init__(f"lock {key!r} is held{held}")


class TaskFailed(CapsuleError):
    """The run ended ``failed`` or ``timeout``; carries the task's traceback text."""

    def __init__(self, task_id: str, status: str, error: str | None, traceback: str | None = None):
        self.task_id = task_id
        self.status = status
        self.error = error
        self.traceback = traceback
        message = f"run {task_id} ended {status}: {error}"
        if traceback:
            message += "\n\nRemote traceback:\n" + traceback.rstrip()
        super().__init__(message)


class TaskCancelled(CapsuleError):
    """The run was cancelled before it produced a result."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        super().__init__(f"run {task_id} was cancelled")


class StoreError(CapsuleError):
    """The store cannot be used: bad path, unwritable, or tampered data."""
