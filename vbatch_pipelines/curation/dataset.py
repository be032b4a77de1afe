"""Gold-star datasets: versioned snapshots of the examples experts approved, in the formats trainers read.

A version is a directory ``$VBATCH_HOME/datasets/<version>/`` with ``examples.parquet`` (every example,
its split and lineage) and exports per split: OpenAI chat messages JSONL, ChatML text JSONL, alpaca and
sharegpt JSON. The expert's edited answer replaces the model's. Identical prompts are kept once (the
latest review wins). The split is by a hash of the prompt, so it is deterministic and a prompt can never
be in both train and eval.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from vbatch_pipelines.curation.filters import DatasetFilter
from vbatch_pipelines.curation.service import gold_star_tasks, latest_dataset
from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_PROJECT, EXPORT_FORMATS, PREFERENCE, SFT, CurationTask, Dataset

EVAL_PERCENT = 10
SPLITS = ("train", "eval")


class UnknownFormat(VbatchError):
    code = "invalid_value"


def prompt_key(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def split_of(key: str, eval_percent: int = EVAL_PERCENT) -> str:
    return "eval" if int(key[:8], 16) % 100 < eval_percent else "train"


def examples_of(tasks: list[CurationTask], facts: dict[str, Any] | None = None,
                chosen: DatasetFilter | None = None) -> list[dict[str, Any]]:
    """The tasks as dataset examples (``facts``: ``review_facts`` of them), only those ``chosen`` passes; one per
    prompt, the latest review's."""
    facts = facts or {"reviewers": {}, "batch_metadata": {}}
    by_prompt: dict[str, dict[str, Any]] = {}
    for task in sorted(tasks, key=lambda t: (t.reviewed_at or 0, t.id)):
        key = prompt_key(task.messages)
        example = {
            "prompt_key": key, "split": split_of(key), "schema": task.schema, "model": task.model or "",
            "batch_id": task.batch_id, "custom_id": task.custom_id, "task_id": task.ls_task_id,
            "edited": task.edited_response is not None, "rating": task.rating,
            "reviewers": facts["reviewers"].get(task.ls_task_id, []), "agreement": task.agreement,
            "batch_metadata": facts["batch_metadata"].get(task.batch_id) or {},
            "messages": [*task.messages, {"role": "assistant", "content": task.final_response()}],
        }
        if chosen is None or chosen.matches(example):
            by_prompt[key] = example
    return sorted(by_prompt.values(), key=lambda e: e["prompt_key"])


def review_facts(db: Database, tasks: list[CurationTask]) -> dict[str, Any]:
    """What filters ask of tasks beyond their own columns: who reviewed each, and its batch's metadata."""
    from sqlalchemy import select

    from vbatch_pipelines.store.models import Batch, CurationReview

    ids, batches = [t.ls_task_id for t in tasks], sorted({t.batch_id for t in tasks})
    reviewers: dict[int, list[str]] = {}
    with db.session() as session:
        for task_id, reviewer in session.execute(select(CurationReview.ls_task_id, CurationReview.reviewer)
                                                 .where(CurationReview.ls_task_id.in_(ids))
                                                 .order_by(CurationReview.reviewer)):
            if reviewer not in reviewers.setdefault(task_id, []):
                reviewers[task_id].append(reviewer)
        metadata = dict(session.execute(select(Batch.id, Batch.metadata_).where(Batch.id.in_(batches))).all())
    return {"reviewers": reviewers, "batch_metadata": {b: {k: str(v) for k, v in (m or {}).items()}
                                                       for b, m in metadata.items()}}


def chatml_text(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def alpaca_record(messages: list[dict[str, str]]) -> dict[str, str]:
    system = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    turns = [m for m in messages if m["role"] not in ("system", "developer")]
    history = "\n".join(f"{m['role']}: {m['content']}" for m in turns[:-2])
    return {"instruction": turns[-2]["content"] if len(turns) >= 2 else "",
            "input": history, "output": turns[-1]["content"], "system": system}


def _sharegpt(messages: list[dict[str, str]]) -> dict[str, Any]:
    names = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt", "tool": "tool"}
    return {"conversations": [{"from": names.get(m["role"], m["role"]), "value": m["content"]} for m in messages]}


def render(examples: list[dict[str, Any]], fmt: str) -> bytes:
    """One split's examples in ``fmt``: JSONL for openai/chatml, a JSON array for alpaca/sharegpt."""
    if fmt == "openai":
        return "".join(json.dumps({"messages": e["messages"]}, ensure_ascii=False) + "\n"
                       for e in examples).encode()
    if fmt == "chatml":
        return "".join(json.dumps({"text": chatml_text(e["messages"])}, ensure_ascii=False) + "\n"
                       for e in examples).encode()
    if fmt == "alpaca":
        return json.dumps([alpaca_record(e["messages"]) for e in examples], ensure_ascii=False, indent=1).encode()
    if fmt == "sharegpt":
        return json.dumps([_sharegpt(e["messages"]) for e in examples], ensure_ascii=False, indent=1).encode()
    raise UnknownFormat(f"Unknown format {fmt!r}; use one of {', '.join(EXPORT_FORMATS[SFT])}")


def export_name(fmt: str, split: str) -> str:
    return f"{split}.{fmt}.{'json' if fmt in ('alpaca', 'sharegpt') else 'jsonl'}"  # JSON arrays; the rest are lines


def _claim_version(db: Database, source_seq: int, run_id: str | None, project_id: str, kind: str) -> Dataset:
    """The next version number, claimed by inserting its row (``building``): the primary key makes two
    builds at once take different numbers instead of writing the same directory. Numbers are the platform's
    (v1 may be one project's, v2 another's, v3 a preference dataset): a version names one dataset wherever it is
    quoted."""
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    while True:
        with db.session() as session:
            taken = session.scalars(select(Dataset.version)).all()
            number = max((int(v.lstrip("v")) for v in taken), default=0) + 1
        claim = Dataset(version=f"v{number}", created_at=int(time.time()), path="", examples=0, train_examples=0,
                        eval_examples=0, fingerprint="", source_seq=source_seq, counts={}, dagster_run_id=run_id,
                        status="building", project_id=project_id, created_by=f"run {run_id}" if run_id else None,
                        kind=kind)
        try:
            with db.session() as session:
                session.add(claim)
            return claim
        except IntegrityError:
            continue  # another build took that number first


def write_version(db: Database, datasets_dir: Path, *, kind: str, source_seq: int, run_id: str | None,
                  project_id: str, table, files: dict[str, bytes], splits: list[str], counts: dict[str, Any],
                  fingerprint: str, chosen: dict[str, Any] | None = None) -> Dataset:
    """Register the next version of ``kind``: ``table`` (one row per example or pair, ``table_name(kind)``) and
    its export ``files``; ``splits`` is each row's split. The version is claimed first; its files are written into
    a temporary directory renamed into place, so a version directory is whole or absent, and the row turns
    ``ready`` only after that; ``chosen``: the filter it was built with. One way for both kinds."""
    import shutil
    import uuid

    import pyarrow.parquet as pq

    claim = _claim_version(db, source_seq, run_id, project_id, kind)
    version = claim.version
    directory = datasets_dir / version
    partial = datasets_dir / f".{version}.{uuid.uuid4().hex[:8]}.partial"
    try:
        partial.mkdir(parents=True)
        pq.write_table(table, partial / table_name(kind))
        for name, data in files.items():
            (partial / name).write_bytes(data)
        _fsync_tree(partial)
        if directory.exists():  # left by a build that died between rename and registration
            shutil.rmtree(directory)
        partial.rename(directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        with db.session() as session:
            session.delete(session.get(Dataset, version))
        raise
    with db.session() as session:
        dataset = session.get(Dataset, version)
        dataset.path, dataset.examples, dataset.counts, dataset.fingerprint = str(directory), len(splits), counts, \
            fingerprint
        dataset.train_examples = sum(split == "train" for split in splits)
        dataset.eval_examples = sum(split == "eval" for split in splits)
        dataset.created_at, dataset.status, dataset.filter = int(time.time()), "ready", chosen
    return db.get(Dataset, version)


def table_name(kind: str) -> str:
    return "pairs.parquet" if kind == PREFERENCE else "examples.parquet"


def build_dataset(db: Database, datasets_dir: Path, *, source_seq: int, run_id: str | None = None,
                  project_id: str = DEFAULT_PROJECT, chosen: DatasetFilter | None = None) -> Dataset:
    """Write the project's next gold-star version from its gold stars in the DB (those ``chosen`` passes; the
    version records the filter) and register it."""
    tasks = gold_star_tasks(db, project_id)
    examples = examples_of(tasks, review_facts(db, tasks), chosen)
    files = {export_name(fmt, split): render([e for e in examples if e["split"] == split], fmt)
             for split in SPLITS for fmt in EXPORT_FORMATS[SFT]}
    counts: dict[str, Any] = {"by_schema": {}, "by_model": {}}
    for e in examples:
        counts["by_schema"][e["schema"]] = counts["by_schema"].get(e["schema"], 0) + 1
        counts["by_model"][e["model"]] = counts["by_model"].get(e["model"], 0) + 1
    fingerprint = hashlib.sha256(b"".join(
        (e["prompt_key"] + e["messages"][-1]["content"]).encode() for e in examples)).hexdigest()[:16]
    return write_version(db, datasets_dir, kind=SFT, source_seq=source_seq, run_id=run_id, project_id=project_id,
                         table=examples_table(examples), files=files, splits=[e["split"] for e in examples],
                         counts=counts, fingerprint=fingerprint,
                         chosen=(chosen.given() or None) if chosen is not None else None)


def examples_table(examples: list[dict[str, Any]]):
    """A version's table: one row per example, with what filters ask of it."""
    import pyarrow as pa

    return pa.table({
        "prompt_key": [e["prompt_key"] for e in examples], "split": [e["split"] for e in examples],
        "schema": [e["schema"] for e in examples], "model": [e["model"] for e in examples],
        "batch_id": [e["batch_id"] for e in examples], "custom_id": [e["custom_id"] for e in examples],
        "task_id": pa.array([e["task_id"] for e in examples], pa.int64()),
        "edited": [e["edited"] for e in examples],
        "rating": pa.array([e["rating"] for e in examples], pa.int64()),
        "reviewers": [json.dumps(e["reviewers"], ensure_ascii=False) for e in examples],
        "agreement": pa.array([e["agreement"] for e in examples], pa.float64()),
        "batch_metadata": [json.dumps(e["batch_metadata"], ensure_ascii=False) for e in examples],
        "messages": [json.dumps(e["messages"], ensure_ascii=False) for e in examples],
    })


def _fsync_tree(directory: Path) -> None:
    import os

    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_examples(dataset: Dataset) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(dataset.path) / "examples.parquet").to_pylist()
    for row in rows:
        for column in ("messages", "reviewers", "batch_metadata"):  # the last two: versions since filters
            if column in row:
                row[column] = json.loads(row[column])
    return rows


def markdown_table(headers: list[str], rows: list[list[Any]], width: int = 80) -> str:
    """Rows as a markdown table for the Dagster UI: cells on one line, pipes escaped, cut at ``width``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for cells in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ")[:width] for c in cells) + " |")
    return "\n".join(lines)


def preview(dataset: Dataset, rows: int = 5) -> str:
    return markdown_table(["split", "schema", "prompt", "answer"], [
        [e["split"], e["schema"], e["messages"][-2]["content"] if len(e["messages"]) > 1 else "",
         e["messages"][-1]["content"]] for e in load_examples(dataset)[:rows]])


CHECKS = ("empty_responses", "duplicate_prompts", "chat_structure", "split_leak", "valid_answers")


def exported_examples(dataset: Dataset) -> list[dict[str, Any]]:
    """The examples as trainers read them: each split's OpenAI-messages export, line by line, with the schema
    the version's table records for its prompt. A line that is not an example is kept as ``broken``."""
    schemas = {row["prompt_key"]: row["schema"] for row in load_examples(dataset)}
    found = []
    for split in SPLITS:
        path = Path(dataset.path) / export_name("openai", split)
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{split}:{number}"
            try:
                messages = json.loads(raw)["messages"]
                prompt = prompt_key([{"role": m["role"], "content": m["content"]} for m in messages[:-1]])
            except (ValueError, KeyError, TypeError, AttributeError):
                found.append({"where": where, "split": split, "broken": True, "messages": [], "prompt_key": ""})
                continue
            found.append({"where": where, "split": split, "broken": False, "messages": messages,
                          "prompt_key": prompt, "schema": schemas.get(prompt)})
    return found


def problems(examples: list[dict[str, Any]], check: str) -> list[str]:
    """What a dataset check finds wrong in the exported examples (an empty list: it passes); each problem
    names the file line (``train:12``)."""
    from vbatch_pipelines.curation.schemas import SCHEMAS

    found: list[str] = []
    whole = [e for e in examples if not e["broken"]]
    if check == "empty_responses":
        found = [e["where"] for e in whole if not str(e["messages"][-1].get("content") or "").strip()]
    elif check == "duplicate_prompts":
        first: dict[str, str] = {}
        for e in whole:
            if e["prompt_key"] in first:
                found.append(f"{e['where']} repeats {first[e['prompt_key']]}")
            first.setdefault(e["prompt_key"], e["where"])
    elif check == "chat_structure":
        found = [e["where"] for e in examples if e["broken"]]
        for e in whole:
            roles = [m.get("role") for m in e["messages"] if m.get("role") not in ("system", "developer")]
            alternating = all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
            if not roles or roles[-1] != "assistant" or not alternating:
                found.append(e["where"])
    elif check == "split_leak":
        splits: dict[str, dict[str, str]] = {}
        for e in whole:
            splits.setdefault(e["prompt_key"], {})[e["split"]] = e["where"]
        found = [" and ".join(sorted(seen.values())) for seen in splits.values() if len(seen) > 1]
    elif check == "valid_answers":
        for e in whole:
            schema = SCHEMAS.get(e.get("schema") or "")
            error = schema.validate(str(e["messages"][-1].get("content") or "")) if schema else None
            if error:
                found.append(f"{e['where']}: {error}")
    else:
        raise ValueError(check)
    return found


def dataset_of_run(db: Database, run_id: str | None, kind: str = SFT) -> Dataset | None:
    """The version of ``kind`` a run built (a check runs in the run that built it); the default project's latest
    when checks run alone, or when the run built none (a preference dataset with no new pairs)."""
    from sqlalchemy import select

    if run_id:
        with db.session() as session:
            built = session.scalars(select(Dataset).where(Dataset.dagster_run_id == run_id, Dataset.kind == kind,
                                                          Dataset.status == "ready")).first()
        if built is not None:
            return built
    return latest_dataset(db, kind=kind)


def check_dataset(db: Database, run_id: str | None, check: str) -> tuple[str | None, list[str]]:
    dataset = dataset_of_run(db, run_id)
    if dataset is None:
        return None, []
    return dataset.version, problems(exported_examples(dataset), check)


def export_path(dataset: Dataset, fmt: str, split: str) -> Path:
    formats = EXPORT_FORMATS[dataset.kind]
    if fmt not in formats:
        raise UnknownFormat(f"Unknown format {fmt!r} for a {dataset.kind} dataset; use one of {', '.join(formats)}",
                            "format")
    if split not in SPLITS:
        raise UnknownFormat(f"Unknown split {split!r}; use train or eval", "split")
    return Path(dataset.path) / export_name(fmt, split)


def export_filename(dataset: Dataset, path: Path) -> str:
    """The name a download is saved under: what it holds, its version and its file."""
    return f"{'preferences' if dataset.kind == PREFERENCE else 'gold-stars'}-{dataset.version}-{path.name}"
