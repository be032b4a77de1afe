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

from vbatch_pipelines.curation.service import gold_star_tasks, latest_dataset
from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import EXPORT_FORMATS, CurationTask, Dataset

EVAL_PERCENT = 10
SPLITS = ("train", "eval")


class UnknownFormat(VbatchError):
    code = "invalid_value"


def prompt_key(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def split_of(key: str, eval_percent: int = EVAL_PERCENT) -> str:
    return "eval" if int(key[:8], 16) % 100 < eval_percent else "train"


def examples_of(tasks: list[CurationTask]) -> list[dict[str, Any]]:
    by_prompt: dict[str, dict[str, Any]] = {}
    for task in sorted(tasks, key=lambda t: (t.reviewed_at or 0, t.id)):
        key = prompt_key(task.messages)
        answer = task.final_response()
        by_prompt[key] = {
            "prompt_key": key, "split": split_of(key), "schema": task.schema, "model": task.model or "",
            "batch_id": task.batch_id, "custom_id": task.custom_id, "task_id": task.ls_task_id,
            "edited": task.edited_response is not None, "rating": task.rating,
            "messages": [*task.messages, {"role": "assistant", "content": answer}],
        }
    return sorted(by_prompt.values(), key=lambda e: e["prompt_key"])


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
    raise UnknownFormat(f"Unknown format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")


def export_name(fmt: str, split: str) -> str:
    return f"{split}.{fmt}.{'jsonl' if fmt in ('openai', 'chatml') else 'json'}"


def _next_version(db: Database) -> str:
    latest = latest_dataset(db)
    number = int(latest.version.lstrip("v")) + 1 if latest else 1
    return f"v{number}"


def build_dataset(db: Database, datasets_dir: Path, *, source_seq: int, run_id: str | None = None) -> Dataset:
    """Write the next version from the gold stars in the DB and register it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    examples = examples_of(gold_star_tasks(db))
    version = _next_version(db)
    directory = datasets_dir / version
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "prompt_key": [e["prompt_key"] for e in examples], "split": [e["split"] for e in examples],
        "schema": [e["schema"] for e in examples], "model": [e["model"] for e in examples],
        "batch_id": [e["batch_id"] for e in examples], "custom_id": [e["custom_id"] for e in examples],
        "task_id": pa.array([e["task_id"] for e in examples], pa.int64()),
        "edited": [e["edited"] for e in examples],
        "rating": pa.array([e["rating"] for e in examples], pa.int64()),
        "messages": [json.dumps(e["messages"], ensure_ascii=False) for e in examples],
    })
    pq.write_table(table, directory / "examples.parquet")
    for split in SPLITS:
        part = [e for e in examples if e["split"] == split]
        for fmt in EXPORT_FORMATS:
            (directory / export_name(fmt, split)).write_bytes(render(part, fmt))
    counts: dict[str, Any] = {"by_schema": {}, "by_model": {}}
    for e in examples:
        counts["by_schema"][e["schema"]] = counts["by_schema"].get(e["schema"], 0) + 1
        counts["by_model"][e["model"]] = counts["by_model"].get(e["model"], 0) + 1
    fingerprint = hashlib.sha256(b"".join(
        (e["prompt_key"] + e["messages"][-1]["content"]).encode() for e in examples)).hexdigest()[:16]
    dataset = Dataset(version=version, created_at=int(time.time()), path=str(directory), examples=len(examples),
                      train_examples=sum(e["split"] == "train" for e in examples),
                      eval_examples=sum(e["split"] == "eval" for e in examples), fingerprint=fingerprint,
                      source_seq=source_seq, counts=counts, dagster_run_id=run_id)
    with db.session() as session:
        session.add(dataset)
    return dataset


def load_examples(dataset: Dataset) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(dataset.path) / "examples.parquet").to_pylist()
    for row in rows:
        row["messages"] = json.loads(row["messages"])
    return rows


def preview(dataset: Dataset, rows: int = 5) -> str:
    lines = ["| split | schema | prompt | answer |", "|---|---|---|---|"]
    for e in load_examples(dataset)[:rows]:
        prompt = e["messages"][-2]["content"] if len(e["messages"]) > 1 else ""
        cells = [e["split"], e["schema"], prompt, e["messages"][-1]["content"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ")[:80] for c in cells) + " |")
    return "\n".join(lines)


def problems(examples: list[dict[str, Any]], check: str) -> list[str]:
    """What a dataset check finds wrong (an empty list: it passes)."""
    found: list[str] = []
    if check == "empty_responses":
        found = [e["custom_id"] for e in examples if not e["messages"][-1]["content"].strip()]
    elif check == "duplicate_prompts":
        seen: set[str] = set()
        for e in examples:
            key = prompt_key(e["messages"][:-1])
            if key in seen:
                found.append(e["custom_id"])
            seen.add(key)
    elif check == "chat_structure":
        for e in examples:
            roles = [m["role"] for m in e["messages"] if m["role"] not in ("system", "developer")]
            alternating = all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
            if not roles or roles[-1] != "assistant" or not alternating:
                found.append(e["custom_id"])
    elif check == "split_leak":
        splits: dict[str, set[str]] = {}
        for e in examples:
            splits.setdefault(prompt_key(e["messages"][:-1]), set()).add(e["split"])
        found = [key[:12] for key, seen_in in splits.items() if len(seen_in) > 1]
    else:
        raise ValueError(check)
    return found


def check_latest(db: Database, check: str) -> tuple[str | None, list[str]]:
    dataset = latest_dataset(db)
    if dataset is None:
        return None, []
    return dataset.version, problems(load_examples(dataset), check)


def export_path(dataset: Dataset, fmt: str, split: str) -> Path:
    if fmt not in EXPORT_FORMATS:
        raise UnknownFormat(f"Unknown format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}", "format")
    if split not in SPLITS:
        raise UnknownFormat(f"Unknown split {split!r}; use train or eval", "split")
    return Path(dataset.path) / export_name(fmt, split)
