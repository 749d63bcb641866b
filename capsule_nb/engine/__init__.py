"""The engine layer: where runs start, retry, time out, get cancelled and finish.

It knows nothing of the App, sessions, notebooks or widgets: the App hands
the runtime a store, its settings, a way to find tasks, and a ``Display``
that the notebook layer implements.
"""
