"""Everything of vbatch that reaches into Dagster's internals, behind one wall: the warm run launcher
(``run_launcher``), the SQLite event log without an fsync per event (``event_log``), cluster mode's run launcher
and Celery app (``cluster_launcher``, ``celery_app``), pool-slot claims (``pools``) and the storage migration
``vbatch up`` runs (``storage``). Every ``dagster._`` import is made in ``_compat``, which checks at import that
what vbatch relies on still exists: a Dagster upgrade that renames one fails loudly there, never silently.
``tests/test_layout.py`` fails on a ``dagster._`` import anywhere else."""
