"""A blocking kernel manager for an ipykernel of this Python, for tests and benchmarks."""

from __future__ import annotations

from typing import Any

from capsule_nb.demo import kernel_classes


def kernel_manager(**kwargs: Any) -> Any:
    """A ``KernelManager`` whose ``python3`` is ipykernel on ``sys.executable``."""
    blocking, _ = kernel_classes()
    return blocking(kernel_name="python3", **kwargs)
