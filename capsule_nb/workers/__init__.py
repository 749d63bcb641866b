"""The workers layer: ``process=True`` calls in other OS processes, here or on Dask.

``pool.ProcessPool`` and ``dask.DaskBackend`` take a pickled ``Call`` and give
back a ``Job`` that ends in one ``outcome.Outcome``. This layer knows
nothing of runs, tasks, sessions or widgets: the engine maps a job onto a run.
"""
