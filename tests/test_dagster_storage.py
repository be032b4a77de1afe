"""vbatch's SQLite event log (the embedded default): what it writes in one go must read back exactly as Dagster's
one-event-at-a-time writes do — each partition's planned event, materialization and metadata, and a failed
run's partitions marked failed."""

import pytest
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    DynamicPartitionsDefinition,
    EventRecordsFilter,
    Failure,
    MaterializeResult,
    asset,
    materialize,
)

from vbatch_pipelines.dagster_ext.event_log import SqliteEventLogStorage
from vbatch_pipelines.names import batch_run_tags

items = DynamicPartitionsDefinition(name="items")


@asset(partitions_def=items)
def item(context: AssetExecutionContext) -> MaterializeResult:
    if context.run.tags.get("fail"):
        raise Failure("asked to fail")
    for key in context.partition_keys:
        context.add_asset_metadata({"key_seen": key}, partition_key=key)
    return MaterializeResult()


@pytest.fixture
def instance(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "300")  # as `vbatch up` sets it
    (tmp_path / "dagster.yaml").write_text(
        "event_log_storage:\n  module: vbatch_pipelines.dagster_ext.event_log\n  class: SqliteEventLogStorage\n"
        f"  config:\n    base_dir: {tmp_path / 'history'}\n")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.event_log_storage, SqliteEventLogStorage)
        yield instance


def test_a_partition_range_run_records_every_partition_from_batched_writes(instance, monkeypatch):
    batches: list[int] = []
    store_event_batch = SqliteEventLogStorage.store_event_batch
    monkeypatch.setattr(SqliteEventLogStorage, "store_event_batch",
                        lambda self, events: batches.append(len(events)) or store_event_batch(self, events))
    keys = [f"k{n}" for n in range(5)]
    instance.add_dynamic_partitions(items.name, keys)
    result = materialize([item], instance=instance, tags=batch_run_tags(keys))
    assert result.success
    assert max(batches) == len(keys), batches  # planned events and materializations went in batches

    for key in keys:
        planned = instance.get_event_records(EventRecordsFilter(
            DagsterEventType.ASSET_MATERIALIZATION_PLANNED, asset_key=AssetKey("item"), asset_partitions=[key]))
        assert len(planned) == 1 and planned[0].run_id == result.run_id
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("item"), asset_partitions=[key]), limit=5).records
        assert len(records) == 1
        assert records[0].event_log_entry.asset_materialization.metadata["key_seen"].value == key
    assert set(instance.get_materialized_partitions(AssetKey("item"))) == set(keys)
    entry = instance.get_asset_records([AssetKey("item")])[0].asset_entry  # the cross-run index's asset row
    assert entry.last_materialization_record.run_id == result.run_id
    assert entry.last_materialization.asset_materialization.partition in keys
    in_run = [e for e in instance.all_logs(result.run_id) if e.dagster_event_type in
              (DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_MATERIALIZATION_PLANNED)]
    assert len(in_run) == 2 * len(keys)  # the run's own file has them too


def test_a_failed_range_run_marks_each_of_its_partitions_failed(instance):
    from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

    keys = [f"f{n}" for n in range(3)]
    instance.add_dynamic_partitions(items.name, [*keys, "untouched"])
    result = materialize([item], instance=instance, tags={**batch_run_tags(keys), "fail": "yes"},
                         raise_on_error=False)
    assert not result.success
    cache = get_and_update_asset_status_cache_value(instance, AssetKey("item"), items)
    assert set(cache.deserialize_failed_partition_subsets(items).get_partition_keys()) == set(keys)


def test_a_missing_table_is_not_remembered(instance):
    import sqlalchemy as sa

    storage = instance.event_log_storage
    assert storage.has_table("dynamic_partitions")
    assert not storage.has_table("vbatch_probe")
    with storage.index_connection() as conn:
        conn.execute(sa.text("CREATE TABLE vbatch_probe (id INTEGER)"))
    assert storage.has_table("vbatch_probe")


def test_a_new_run_file_comes_from_the_template_and_an_old_one_goes_through_dagsters_set_up(instance, monkeypatch):
    import sqlite3

    from dagster._core.storage.event_log import SqliteEventLogStorage as DagsterSqliteEventLogStorage

    storage = instance.event_log_storage
    set_ups: list[str] = []
    initdb = DagsterSqliteEventLogStorage._initdb
    monkeypatch.setattr(DagsterSqliteEventLogStorage, "_initdb",
                        lambda self, engine, for_index_shard=False: set_ups.append(engine.url.database)
                        or initdb(self, engine, for_index_shard))
    with storage.run_connection("fresh-run") as conn:
        conn.exec_driver_sql("SELECT count(*) FROM event_logs")
    revision = storage._template()[1]
    assert set_ups == [] and revision  # a copy of the template, stamped with this Dagster's revision

    old = storage.path_for_shard("old-run")
    with sqlite3.connect(old) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.execute("INSERT INTO alembic_version VALUES ('an-older-revision')")
    with storage.run_connection("old-run"):
        pass
    assert set_ups == [old]  # not taken as set up: Dagster's own _initdb decides
