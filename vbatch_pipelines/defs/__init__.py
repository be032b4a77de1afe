"""Dagster definitions by domain, in the shape of Dagster's own ``defs/<domain>`` projects: each module holds
one domain's assets, checks, jobs, sensors and schedules and exposes them as ``defs`` (or, when they need
configuration at load, ``build_defs(...)``); ``vbatch_pipelines/definitions.py`` merges them with the
resources. The domain logic they call lives beside them (``batch/``, ``curation/``, ``models/``,
``fine_tuning/``)."""
