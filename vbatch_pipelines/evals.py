"""Fixed evaluation sets: the same questions for every model, so two fine-tunes (or a retrain next month) are
compared on the same ground.

An admin freezes a set from a dataset version's eval split (gold stars: the expert's answer is gold; preference
pairs: the chosen answer is gold, the rejected one is kept) or from an uploaded file in OpenAI's chat format (the
last assistant turn is gold). Its items are copied into ``$VBATCH_HOME/evals/<id>/items.jsonl`` and fingerprinted:
nothing that happens to the source later changes the set. Each (set, model) is scored by the ``eval_score`` asset
with ``model_comparison``'s metrics; the leaderboard is each model's latest completed run.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vbatch_pipelines.errors import NotFound, VbatchError
from vbatch_pipelines.fine_tuning import comparison as compare
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import (
    DEFAULT_OWNER,
    TRAINER_FORMAT,
    Dataset,
    EvalRun,
    EvalSet,
    File,
    Owner,
    of_project,
)

MAX_ITEMS = 5000  # a set is asked of every model it scores: bounded
RANKED_BY = ("normalized_match", "exact_match", "judge_win_rate")


class EvalError(VbatchError):
    """A request about evaluation sets that cannot be accepted (HTTP 400)."""


class EvalNotFound(NotFound):
    code = "eval_not_found"


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _items_of_source(db: Database, source: dict[str, Any], project_id: str) -> list[dict[str, Any]]:
    """The (prompt, gold) items a source holds, checked; raises EvalError naming the field or line."""
    from vbatch_pipelines.fine_tuning.training_data import check_training_lines

    kind = source.get("type")
    if kind == "dataset":
        dataset = of_project(db.get(Dataset, str(source.get("version") or "")), project_id)
        if dataset is None or dataset.status != "ready":
            raise EvalError(f"No dataset version {source.get('version')!r}", "source.version", "dataset_not_found",
                            404)
        if not dataset.eval_examples:
            raise EvalError(f"Dataset {dataset.version} has no eval split to freeze", "source.version")
        return compare.eval_items(Path(dataset.path) / f"eval.{TRAINER_FORMAT[dataset.kind]}.jsonl")
    if kind == "file":
        record = of_project(db.get(File, str(source.get("file_id") or "")), project_id)
        if record is None:
            raise EvalError(f"No file with id {source.get('file_id')!r}", "source.file_id", "file_not_found", 404)
        try:
            check_training_lines(Path(record.path), param="source.file_id", minimum=1)
        except VbatchError as exc:
            raise EvalError(str(exc).replace("The source.file_id", "The file"), "source.file_id") from exc
        return compare.eval_items(Path(record.path))
    raise EvalError("source.type must be dataset (with version) or file (with file_id)", "source.type")


def create_eval_set(db: Database, evals_dir: Path, *, name: str, source: dict[str, Any],
                    owner: Owner = DEFAULT_OWNER) -> EvalSet:
    """Freeze a set: its items copied and fingerprinted now, never changed after."""
    if not name.strip() or len(name) > 256:
        raise EvalError("name takes 1 to 256 characters", "name")
    items = _items_of_source(db, source, owner.project_id)
    if not items:
        raise EvalError("The source has no items to evaluate on", "source")
    if len(items) > MAX_ITEMS:
        raise EvalError(f"The source has {len(items)} items; a set holds at most {MAX_ITEMS}", "source")
    eval_id = new_id("eval")
    directory = evals_dir / eval_id
    directory.mkdir(parents=True, exist_ok=False)
    frozen = [{k: item[k] for k in ("messages", "gold", "rejected") if k in item} for item in items]
    data = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in frozen).encode()
    (directory / "items.jsonl").write_bytes(data)
    record = EvalSet(id=eval_id, name=name.strip(), created_at=now(), source=source, items=len(frozen),
                     fingerprint=hashlib.sha256(data).hexdigest()[:16], path=str(directory / "items.jsonl"),
                     **owner.columns())
    with db.session() as session:
        session.add(record)
    return record


def get_eval_set(db: Database, eval_id: str, project_id: str | None = None) -> EvalSet:
    found = of_project(db.get(EvalSet, eval_id), project_id)
    if found is None:
        raise EvalNotFound(f"No eval with id {eval_id!r}", "eval_id")
    return found


def eval_set_items(record: EvalSet) -> list[dict[str, Any]]:
    """The frozen items, with the custom ids the scoring batches use; refuses a set whose file changed."""
    data = Path(record.path).read_bytes()
    if hashlib.sha256(data).hexdigest()[:16] != record.fingerprint:
        raise EvalError(f"Eval {record.id}'s items changed on disk since it was frozen (fingerprint "
                        f"{record.fingerprint}); it cannot be scored", "eval_id", "eval_set_changed", 409)
    items = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return [{**item, "custom_id": f"eval-{i}"} for i, item in enumerate(items)]


def record_run(db: Database, record: EvalSet, model: str, owner: Owner = DEFAULT_OWNER) -> EvalRun:
    """A model queued for scoring on the set (the sensor or the API launches its run)."""
    if "|" in model:
        raise EvalError("A model name with '|' cannot be scored", "model")
    run = EvalRun(id=new_id("evalrun"), eval_id=record.id, model=model, status="queued", created_at=now(),
                  **owner.columns())
    with db.session() as session:
        session.add(run)
    return run


def update_run(db: Database, run_id: str, **fields: Any) -> None:
    with db.session() as session:
        run = session.get(EvalRun, run_id)
        for key, value in fields.items():
            setattr(run, key, value)


def runs_of(db: Database, eval_id: str, *, statuses: tuple[str, ...] | None = None) -> list[EvalRun]:
    with db.session() as session:
        query = select(EvalRun).where(EvalRun.eval_id == eval_id)
        if statuses:
            query = query.where(EvalRun.status.in_(statuses))
        return list(session.scalars(query.order_by(EvalRun.created_at.desc(), EvalRun.id.desc())))


def queued_runs(db: Database, older_than_s: int) -> list[EvalRun]:
    with db.session() as session:
        return list(session.scalars(select(EvalRun).where(
            EvalRun.status == "queued", EvalRun.created_at <= now() - older_than_s)))


def score_answers(items: list[dict[str, Any]], answers: dict[str, str]) -> tuple[dict[str, Any], list[dict]]:
    """The model's scores on the set and a sample of its answers beside the gold ones."""
    rows = [{"prompt": item["messages"][-1]["content"] if item["messages"] else "", "gold": item["gold"],
             "answer": answers.get(item["custom_id"], ""),
             "match": compare.normalize(answers.get(item["custom_id"], "")) == compare.normalize(item["gold"])}
            for item in items[:20]]
    return {"examples": len(items), **compare.score(items, answers)}, rows


def leaderboard(db: Database, eval_id: str) -> list[dict[str, Any]]:
    """Each model's latest completed run on the set, best first (normalised match, then exact match, then the
    judge's win rate)."""
    latest: dict[str, EvalRun] = {}
    for run in runs_of(db, eval_id, statuses=("completed",)):
        latest.setdefault(run.model, run)
    rows = [{"model": model, "run_id": run.id, "finished_at": run.finished_at, **(run.scores or {})}
            for model, run in latest.items()]
    return sorted(rows, key=lambda r: tuple(-(r.get(metric) if r.get(metric) is not None else -1)
                                            for metric in RANKED_BY) + (r["model"],))
