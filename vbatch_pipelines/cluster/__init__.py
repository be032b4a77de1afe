"""Cluster mode: several nodes share one Dagster instance (PostgreSQL), one metadata DB (PostgreSQL) and one
store (a shared filesystem); runs go through a Redis broker to the nodes' Celery workers (dagster-celery).

- ``config``: what cluster mode needs, the queue names, the instance's ``dagster.yaml`` pieces.
- ``dagster_ext.cluster_launcher``: ``ClusterRunLauncher``, dagster-celery's ``CeleryRunLauncher`` that routes
  GPU-bound runs to the ``gpu`` queue, records the queue on the run, and tells run monitoring when a worker died.
- ``dagster_ext.celery_app``: the Celery app a node's worker runs (dagster-celery's tasks, the code location loaded).
- ``node``: ``vbatch worker``, a node's supervised Celery workers.
"""
