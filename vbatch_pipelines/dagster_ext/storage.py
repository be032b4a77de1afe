"""Dagster's own storage schema, migrated as `vbatch up` starts (``dagster instance migrate``, only when needed)."""

from __future__ import annotations


def migrate_storage(instance) -> None:
    """`dagster instance migrate` for an instance whose storage an older Dagster made (only then: it visits every
    run's SQLite file); one a newer Dagster migrated is refused (SchemaTooNew) and left as it is."""
    from alembic.script import ScriptDirectory
    from dagster import __version__ as dagster_version

    from vbatch_pipelines.dagster_ext._compat import storage_sql as sql
    from vbatch_pipelines.store.db import SchemaTooNew

    behind = [version for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
              if storage is not None and (version := storage.alembic_version()) and version[0] != version[1]]
    if not behind:
        return
    known = {revision.revision for revision in ScriptDirectory.from_config(
        sql.get_alembic_config(sql.__file__)).walk_revisions()}
    newer = sorted({current for current, _ in behind if current not in known})
    if newer:
        raise SchemaTooNew(f"Dagster's storage of {instance.root_directory} is at schema revision {', '.join(newer)}, "
                           f"which this Dagster ({dagster_version}, newest {behind[0][1]}) does not know: a newer "
                           "vbatch migrated it. Run that version; this one leaves the storage as it is.")
    print(f"Migrating Dagster's storage to Dagster {dagster_version} (dagster instance migrate) ...", flush=True)
    instance.upgrade(print)
