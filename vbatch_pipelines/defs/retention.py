"""Retention: one asset, ``disk_retention``, materialized by ``retention_job`` on ``retention_schedule`` (daily by
default, VBATCH_RETENTION_CRON) or from the UI. Each run deletes expired files (record and bytes; a batch keeps
its record) and the directories of finished batches whose files are all gone, finished Dagster runs past the run
retention with their event and compute logs, rotates this node's service and engine logs by size, and records
what it did and how full the disk is in the materialization's metadata (plotted in the UI)."""

import time

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    DefaultScheduleStatus,
    Definitions,
    MaterializeResult,
    MetadataValue,
    ScheduleDefinition,
    asset,
    define_asset_job,
    in_process_executor,
)

from resources import FileStore, MetadataDB, RetentionPolicy
from vbatch_pipelines.retention import (
    disk_usage,
    expire_files,
    human_bytes,
    log_files,
    prune_runs,
    remove_spent_batch_dirs,
    rotate_logs,
)

RETENTION_JOB = "retention_job"


@asset(group_name="operations", kinds={"python"})
def disk_retention(context: AssetExecutionContext, metadata_db: MetadataDB, file_store: FileStore,
                   retention_policy: RetentionPolicy) -> MaterializeResult:
    """Expired files, spent batch directories, old finished runs and oversized logs deleted or rotated under the
    retention policy; the disk's use by kind and its free space after."""
    policy, db, now = retention_policy, metadata_db.db, int(time.time())
    files = expire_files(db, policy.file_retention_days, now)
    context.log.info(f"Deleted {files.deleted} expired files ({human_bytes(files.bytes)})"
                     + (f"; kept {len(files.in_use)} that unfinished batches read: {', '.join(files.in_use[:10])}"
                        if files.in_use else ""))
    dirs, dir_bytes = remove_spent_batch_dirs(db, file_store.batches_dir)
    context.log.info(f"Removed {dirs} directories of finished batches whose files are gone ({human_bytes(dir_bytes)})")
    runs = prune_runs(context.instance, policy.run_retention_days, now) if policy.run_retention_days else []
    context.log.info(f"Deleted {len(runs)} finished Dagster runs older than {policy.run_retention_days} days"
                     if policy.run_retention_days else "Dagster runs are kept (VBATCH_RUN_RETENTION_DAYS=off)")
    rotated = rotate_logs(log_files(file_store), policy.log_max_bytes, policy.log_backups) \
        if policy.log_max_bytes else {}
    for path, size in rotated.items():
        context.log.info(f"Rotated {path} ({human_bytes(size)})")
    usage = disk_usage(file_store, max_age_s=0)
    return MaterializeResult(metadata={
        "files_deleted": files.deleted,
        "file_bytes_deleted": files.bytes,
        "files_kept_in_use": len(files.in_use),
        "batch_dirs_removed": dirs,
        "batch_dir_bytes_removed": dir_bytes,
        "runs_deleted": len(runs),
        "logs_rotated": len(rotated),
        "log_bytes_rotated": sum(rotated.values()),
        "disk_free_bytes": usage.free,
        "disk_total_bytes": usage.total,
        "disk_free_percent": MetadataValue.float(round(usage.free_percent, 2)),
        **{f"disk_bytes_{kind}": size for kind, size in usage.kinds.items()},
    })


def build_defs(cron: str | None) -> Definitions:
    """The retention domain: its job, and its schedule on ``cron`` (None: none; the job still runs from the UI)."""
    retention_job = define_asset_job(
        RETENTION_JOB, selection=AssetSelection.assets(disk_retention), executor_def=in_process_executor,
        description="Delete expired files and old finished runs, rotate logs, measure the disk (retention_schedule).")
    schedules = [ScheduleDefinition(name="retention_schedule", cron_schedule=cron, job=retention_job,
                                    default_status=DefaultScheduleStatus.RUNNING,
                                    description="Retention (VBATCH_RETENTION_CRON)")] if cron else []
    return Definitions(assets=[disk_retention], jobs=[retention_job], schedules=schedules)
