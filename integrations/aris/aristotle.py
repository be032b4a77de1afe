"""Aristotle's PostgreSQL as a Dagster resource: a thin client with its own connection, short timeouts, and
compare-and-set writes. vbatch does not own this database and never changes its schema; its Prisma columns
are camelCase and quoted in every statement."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr

from vbatch_pipelines.errors import Unavailable, VbatchError

VICTORY = "VICTORY"
RESULTS = ("PENDING", "VICTORY", "DEFEAT", "NEUTRAL")
ANALYSIS_TYPE = "conquest_analysis"
_COLUMNS = ('id, result, "useAsExample", "updatedAt", philosopher, domain, "conquestType", title, description, '
            '"resultNotes", "evaluatedBy"')


class AristotleUnavailable(Unavailable):
    """Aristotle's database did not answer (down, refusing connections, too slow); nothing was written."""

    code = "aristotle_unavailable"


class AristotleSchemaMismatch(VbatchError):
    """Aristotle's database lacks a table or column vbatch reads or writes: nothing is synced until it has them
    (retrying would fail the same way on every link)."""

    status = 503
    code = "aristotle_schema_mismatch"


# What vbatch reads and writes in Aristotle's database (its Prisma columns are camelCase).
REQUIRED_COLUMNS = {
    "Conquest": ("id", "result", "useAsExample", "updatedAt", "philosopher", "domain", "conquestType", "title",
                 "description", "resultNotes", "evaluatedBy", "evaluatedAt"),
    "ml_analysis_rating": ("id", "conquest_analysis_id", "analysis_type", "rating", "is_gold_star",
                           "use_as_sample_response", "philosopher", "domain", "label_studio_task_id",
                           "label_studio_annotation_id", "created_at", "updated_at"),
}


@dataclass(frozen=True)
class Conquest:
    id: str
    result: str | None
    use_as_example: bool | None
    updated_at: datetime | None
    philosopher: str
    domain: str
    conquest_type: str | None
    title: str | None = None
    description: str | None = None
    result_notes: str | None = None
    evaluated_by: str | None = None

    @property
    def victory(self) -> bool:
        return self.result == VICTORY

    @property
    def stamp(self) -> str | None:
        """``updatedAt`` as exact text (microseconds), how vbatch remembers the row state it saw."""
        return None if self.updated_at is None else self.updated_at.isoformat(timespec="microseconds")

    @classmethod
    def from_row(cls, row: Any) -> Conquest:
        return cls(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10])


class Aristotle(ConfigurableResource):
    url: str = Field(description="Aristotle's PostgreSQL URL (VBATCH_ARIS_DATABASE_URL, an EnvVar)")
    connect_timeout_s: int = Field(default=3, ge=1)
    statement_timeout_ms: int = Field(default=5000, ge=100)

    _engine: Any = PrivateAttr(default=None)

    @property
    def engine(self):
        if self._engine is None:
            from sqlalchemy import create_engine

            from vbatch_pipelines.store.db import normalize_url

            self._engine = create_engine(
                normalize_url(self.url), pool_pre_ping=True, pool_size=4, max_overflow=4,
                connect_args={"connect_timeout": self.connect_timeout_s,
                              "options": f"-c statement_timeout={self.statement_timeout_ms}",
                              "application_name": "vbatch-aris"})
        return self._engine

    def _run(self, fn):
        import sqlalchemy.exc

        try:
            with self.engine.begin() as connection:
                return fn(connection)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
            self.engine.dispose()  # connections to a database that went away are useless
            raise AristotleUnavailable(f"Aristotle's database is unreachable: {str(exc).splitlines()[0]}") from exc

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    # -- reads -----------------------------------------------------------------------------------------

    def check_schema(self) -> None:
        """AristotleSchemaMismatch naming every table and column vbatch needs that the database lacks (checked
        as `vbatch up` starts and before each sync, not found out link by link)."""
        from sqlalchemy import text

        query = text("SELECT table_name, column_name FROM information_schema.columns "
                     "WHERE table_schema = current_schema() AND table_name IN ('Conquest', 'ml_analysis_rating')")
        present = self._run(lambda c: {(row[0], row[1]) for row in c.execute(query)})
        missing = [f'{table}."{column}"' for table, columns in REQUIRED_COLUMNS.items() for column in columns
                   if (table, column) not in present]
        if missing:
            raise AristotleSchemaMismatch(
                f"Aristotle's database lacks what vbatch reads and writes: {', '.join(missing)}. Nothing is synced "
                "until it has them (or turn the Aris extension off: unset VBATCH_ARIS_DATABASE_URL)")

    def get(self, conquest_id: str) -> Conquest | None:
        found = self.read([conquest_id])
        return found.get(conquest_id)

    def read(self, ids: Iterable[str], chunk: int = 1000) -> dict[str, Conquest]:
        """The conquests with these ids (missing ones are left out)."""
        from sqlalchemy import text

        ids = list(dict.fromkeys(ids))
        query = text(f'SELECT {_COLUMNS} FROM "Conquest" WHERE id = ANY(:ids)')

        def read(connection) -> dict[str, Conquest]:
            out: dict[str, Conquest] = {}
            for start in range(0, len(ids), chunk):
                for row in connection.execute(query, {"ids": ids[start:start + chunk]}):
                    conquest = Conquest.from_row(row)
                    out[conquest.id] = conquest
            return out

        return self._run(read) if ids else {}

    def changed_since(self, after: datetime | None, after_id: str = "", page: int = 5000) -> Iterator[list[Conquest]]:
        """Conquests by ("updatedAt", id) after the given key, a page at a time (keyset: rows sharing one
        ``updatedAt`` are each read once)."""
        from sqlalchemy import text

        first = text(f'SELECT {_COLUMNS} FROM "Conquest" ORDER BY "updatedAt", id LIMIT :n')
        after_key = text(f'SELECT {_COLUMNS} FROM "Conquest" WHERE ("updatedAt", id) > (:at, :id) '
                         'ORDER BY "updatedAt", id LIMIT :n')
        while True:
            if after is None:
                rows = self._run(lambda c: [Conquest.from_row(r) for r in c.execute(first, {"n": page})])
            else:
                rows = self._run(lambda c: [Conquest.from_row(r) for r in c.execute(
                    after_key, {"at": after, "id": after_id, "n": page})])
            if not rows:
                return
            yield rows
            if len(rows) < page or rows[-1].updated_at is None:
                return
            after, after_id = rows[-1].updated_at, rows[-1].id

    def victory_ids(self, ids: Iterable[str]) -> set[str]:
        return {c.id for c in self.read(ids).values() if c.victory}

    def vbatch_rating_counts(self, install: str) -> dict[str, int]:
        """conquest id -> how many rating rows this vbatch install wrote for it (one is right), rows from before
        ids carried the install (``vbatch-<task id>``) included."""
        from sqlalchemy import text

        query = text("SELECT conquest_analysis_id, count(*) FROM ml_analysis_rating WHERE id LIKE :mine "
                     "OR id ~ '^vbatch-[0-9]+$' GROUP BY conquest_analysis_id")
        return self._run(lambda c: {row[0]: int(row[1]) for row in c.execute(query, {"mine": f"vbatch-{install}-%"})})

    # -- compare-and-set writes ------------------------------------------------------------------------

    def mark_victory(self, seen: Conquest, *, reviewer: str, rating: int, task_id: int,
                     annotation_id: int | None, rating_id: str) -> Conquest | None:
        """Set VICTORY (and the example flags) and upsert vbatch's rating row (``rating_id``), in one transaction,
        only if the row is still as ``seen``; None when it changed in between (nothing written: retry next
        round)."""
        return self._compare_and_set(
            seen, '''result = 'VICTORY', "useAsExample" = true, "evaluatedBy" = :reviewer, "evaluatedAt" = now()''',
            {"reviewer": reviewer}, gold=True, rating=rating, task_id=task_id, annotation_id=annotation_id,
            rating_id=rating_id)

    def unmark_victory(self, seen: Conquest, *, restore: str, task_id: int, rating_id: str) -> Conquest | None:
        """Put ``result`` back to ``restore`` (what it was before vbatch set VICTORY), clear the example flag
        and vbatch's rating flags; compare-and-set like ``mark_victory``."""
        return self._compare_and_set(seen, 'result = :restore, "useAsExample" = false', {"restore": restore},
                                     gold=False, rating=None, task_id=task_id, annotation_id=None,
                                     rating_id=rating_id)

    def _compare_and_set(self, seen: Conquest, assignments: str, params: dict[str, Any], *, gold: bool,
                         rating: int | None, task_id: int, annotation_id: int | None,
                         rating_id: str) -> Conquest | None:
        from sqlalchemy import text

        update = text(f'''UPDATE "Conquest" SET {assignments}, "updatedAt" = now()
            WHERE id = :id AND result IS NOT DISTINCT FROM :seen_result AND "updatedAt" IS NOT DISTINCT FROM :seen_at
            RETURNING {_COLUMNS}''')

        def write(connection) -> Conquest | None:
            row = connection.execute(update, {**params, "id": seen.id, "seen_result": seen.result,
                                              "seen_at": seen.updated_at}).first()
            if row is None:
                return None
            _upsert_rating(connection, seen, gold=gold, rating=rating, task_id=task_id, annotation_id=annotation_id,
                           rating_id=rating_id)
            return Conquest.from_row(row)

        return self._run(write)


def rating_id(install: str, conquest_id: str) -> str:
    """vbatch's rating row of a conquest: one per install and conquest (a Label Studio task id would repeat
    after a reset of Label Studio, and in every other install)."""
    return f"vbatch-{install}-{conquest_id}"


def _upsert_rating(connection, conquest: Conquest, *, gold: bool, rating: int | None, task_id: int,
                   annotation_id: int | None, rating_id: str) -> None:
    """vbatch's one rating row per conquest (``rating_id``): Aristotle has no unique constraint to upsert on, so
    update, and insert when there was none. A row this task got before ids carried the install (``vbatch-<task
    id>``, same conquest) is taken over under the new id. The Conquest row updated just before holds the lock
    that keeps two writers of the same conquest apart."""
    from sqlalchemy import text

    params = {"id": rating_id, "legacy": f"vbatch-{task_id}", "gold": gold, "rating": rating, "task": task_id,
              "annotation": annotation_id, "conquest": conquest.id, "philosopher": conquest.philosopher,
              "domain": conquest.domain, "type": ANALYSIS_TYPE}
    updated = connection.execute(text(
        "UPDATE ml_analysis_rating SET id = :id, is_gold_star = :gold, use_as_sample_response = :gold, "
        "rating = COALESCE(:rating, rating), label_studio_task_id = :task, "
        "label_studio_annotation_id = COALESCE(:annotation, label_studio_annotation_id), updated_at = now() "
        "WHERE id = :id OR (id = :legacy AND conquest_analysis_id = :conquest)"), params)
    if updated.rowcount == 0 and gold:
        connection.execute(text(
            "INSERT INTO ml_analysis_rating (id, conquest_analysis_id, analysis_type, rating, is_gold_star, "
            "use_as_sample_response, philosopher, domain, label_studio_task_id, label_studio_annotation_id, "
            "created_at, updated_at) VALUES (:id, :conquest, :type, :rating, true, true, :philosopher, :domain, "
            ":task, :annotation, now(), now())"), params)
