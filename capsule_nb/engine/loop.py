"""The event loop async runs use: the kernel's when one is bound, else the running
one, else a daemon thread's own."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Coroutine


class LoopBinding:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._making = threading.Lock()  # threads asking at once (a script's thread tasks) get one loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            return loop
        with self._making:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                return loop
            try:
                loop = asyncio.get_running_loop()
                self._thread = threading.get_ident()
            except RuntimeError:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    self._thread = threading.get_ident()
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=serve, name="capsule-loop", daemon=True).start()
                ready.wait()
            self._loop = loop
            return loop

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop`` (the kernel's) from now on; called by ``%load_ext``."""
        self._loop = loop
        self._thread = threading.get_ident()

    def forget(self, loop: asyncio.AbstractEventLoop) -> None:
        """``loop`` is closing (a script's ``asyncio.run`` ends): runs started from now on,
        such as a retry of one it interrupted, go to another loop, not to it."""
        with self._making:
            if self._loop is loop:
                self._loop, self._thread = None, None

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self.loop
        if self.on_loop_thread():
            loop.call_soon(callback, *args)
        else:
            loop.call_soon_threadsafe(callback, *args)

    def run_coroutine(self, coro: Coroutine) -> Any:
        """Run ``coro`` on the loop from another thread and wait for it."""
        if self.on_loop_thread():
            coro.close()
            raise RuntimeError("cannot block the runtime's own loop; await this instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
