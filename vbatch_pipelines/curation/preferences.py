"""Preference datasets: what experts preferred, as (prompt, chosen, rejected) pairs for DPO.

Every expert edit is a pair: the edited answer (chosen) over the model's (rejected), kept only when the two differ
beyond whitespace. Ratings rank answers to the same prompt: the best-rated answer is chosen over each lower-rated
one. A pair is kept once (its prompt and both answers, whitespace folded); when two reviews disagree about the
same two answers, the later review wins. Splits follow the prompt's hash (``split_of``), as gold stars do, so a
prompt is in the same split in both kinds of dataset.

A version is a directory like a gold-star one: ``pairs.parquet`` and per split OpenAI's preference fine-tuning
format (``input.messages``, ``preferred_output``, ``non_preferred_output``) and TRL's (``prompt``, ``chosen``,
``rejected``, conversational). Uploaded preference files are read with the same parser (``parse_line``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vbatch_pipelines.curation.dataset import (
    SPLITS,
    export_name,
    markdown_table,
    prompt_key,
    split_of,
    write_version,
)
from vbatch_pipelines.curation.service import latest_dataset, reviewed_tasks
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_PROJECT, EXPORT_FORMATS, PREFERENCE, CurationTask, Dataset

PROMPT_ROLES = ("system", "developer", "user", "assistant", "tool")
SAME_ANSWER = "preferred_output and non_preferred_output are the same answer (beyond whitespace)"


def folded(text: str) -> str:
    """Whitespace folded: two answers that differ only here are the same answer."""
    return " ".join(text.split())


def pairs_of(tasks: list[CurationTask]) -> list[dict[str, Any]]:
    """The pairs the reviews of ``tasks`` make (edits, then ratings), oldest review first so later ones win."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(task: CurationTask, chosen: str, rejected: str, source: str) -> None:
        key = prompt_key(task.messages)
        found.pop((key, folded(rejected), folded(chosen)), None)  # the reverse preference, said earlier
        found[(key, folded(chosen), folded(rejected))] = {
            "prompt_key": key, "split": split_of(key), "source": source, "schema": task.schema,
            "model": task.model or "", "batch_id": task.batch_id, "custom_id": task.custom_id,
            "task_id": task.ls_task_id, "prompt": task.messages, "chosen": chosen, "rejected": rejected}

    ordered = sorted(tasks, key=lambda t: (t.reviewed_at or 0, t.id))
    for task in ordered:
        if task.edited_response is not None and folded(task.edited_response) != folded(task.response):
            add(task, task.edited_response, task.response, "edit")
    by_prompt: dict[str, list[CurationTask]] = {}
    for task in ordered:
        if task.rating is not None:
            by_prompt.setdefault(prompt_key(task.messages), []).append(task)
    for rated in by_prompt.values():
        best = max(rated, key=lambda t: (t.rating, t.reviewed_at or 0, t.id))
        for other in rated:
            if other.rating < best.rating and folded(other.final_response()) != folded(best.final_response()):
                add(best, best.final_response(), other.final_response(), "rating")
    return sorted(found.values(), key=lambda p: (p["prompt_key"], folded(p["chosen"]), folded(p["rejected"])))


def openai_line(prompt: list[dict[str, Any]], chosen: str, rejected: str) -> dict[str, Any]:
    return {"input": {"messages": prompt}, "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def trl_line(prompt: list[dict[str, Any]], chosen: str, rejected: str) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def render(pairs: list[dict[str, Any]], fmt: str) -> bytes:
    line = {"openai": openai_line, "trl": trl_line}[fmt]
    return "".join(json.dumps(line(p["prompt"], p["chosen"], p["rejected"]), ensure_ascii=False) + "\n"
                   for p in pairs).encode()


def fingerprint_of(pairs: list[dict[str, Any]]) -> str:
    return hashlib.sha256(b"".join(
        json.dumps([p["prompt_key"], p["split"], p["chosen"], p["rejected"]]).encode() for p in pairs)).hexdigest()[:16]


def build_preference_dataset(db: Database, datasets_dir: Path, *, source_seq: int, run_id: str | None = None,
                             project_id: str = DEFAULT_PROJECT) -> tuple[Dataset | None, bool]:
    """The project's next preference version, or its latest when the pairs have not changed (no version is made
    for nothing new, nor for no pairs at all); returns (version or None, whether it is new)."""
    import pyarrow as pa

    pairs = pairs_of(reviewed_tasks(db, project_id))
    fingerprint = fingerprint_of(pairs)
    latest = latest_dataset(db, project_id, kind=PREFERENCE)
    if not pairs or (latest is not None and latest.fingerprint == fingerprint):
        return latest, False
    table = pa.table({
        **{column: [p[column] for p in pairs] for column in (
            "prompt_key", "split", "source", "schema", "model", "batch_id", "custom_id", "chosen", "rejected")},
        "task_id": pa.array([p["task_id"] for p in pairs], pa.int64()),
        "prompt": [json.dumps(p["prompt"], ensure_ascii=False) for p in pairs],
    })
    files = {export_name(fmt, split): render([p for p in pairs if p["split"] == split], fmt)
             for split in SPLITS for fmt in EXPORT_FORMATS[PREFERENCE]}
    counts: dict[str, Any] = {"by_source": {}, "by_schema": {}, "by_model": {}}
    for p in pairs:
        for field, key in (("by_source", p["source"]), ("by_schema", p["schema"]), ("by_model", p["model"])):
            counts[field][key] = counts[field].get(key, 0) + 1
    version = write_version(db, datasets_dir, kind=PREFERENCE, source_seq=source_seq, run_id=run_id,
                            project_id=project_id, table=table, files=files, splits=[p["split"] for p in pairs],
                            counts=counts, fingerprint=fingerprint)
    return version, True


# --- OpenAI's preference format, line by line: uploads and the checks read it the same way ------------------

def parse_line(raw: bytes | str) -> tuple[dict[str, Any] | None, str | None]:
    """(pair, None) for a line in OpenAI's preference fine-tuning format, or (None, what is wrong with it, naming
    the field)."""
    try:
        line = json.loads(raw)
    except ValueError as exc:
        return None, f"not valid JSON ({exc.msg})"
    if not isinstance(line, dict):
        return None, "expected an object with input, preferred_output and non_preferred_output"
    messages = (line.get("input") or {}).get("messages") if isinstance(line.get("input"), dict) else None
    if not isinstance(messages, list) or not messages:
        return None, 'input.messages: expected a non-empty list of messages'
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in PROMPT_ROLES:
            return None, f"input.messages[{i}] needs a role of {', '.join(PROMPT_ROLES)}"
        if not isinstance(message.get("content"), str):
            return None, f"input.messages[{i}].content must be a string"
    if messages[-1]["role"] not in ("user", "tool"):
        return None, "input.messages must end with a user (or tool) message: the outputs answer it"
    answers = {}
    for field in ("preferred_output", "non_preferred_output"):
        output = line.get(field)
        if not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict):
            return None, f"{field}: expected a list of one assistant message"
        if output[0].get("role") != "assistant":
            return None, f"{field}[0].role must be assistant"
        content = output[0].get("content")
        if not isinstance(content, str) or not content.strip():
            return None, f"{field}[0].content must be a non-empty string"
        answers[field] = content
    if folded(answers["preferred_output"]) == folded(answers["non_preferred_output"]):
        return None, SAME_ANSWER
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
    return {"prompt": prompt, "chosen": answers["preferred_output"],
            "rejected": answers["non_preferred_output"]}, None


def exported_pairs(dataset: Dataset) -> list[dict[str, Any]]:
    """Each split's OpenAI-format export, line by line; a line that is not a pair keeps its problem."""
    found = []
    for split in SPLITS:
        path = Path(dataset.path) / export_name("openai", split)
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            pair, problem = parse_line(raw)
            found.append({"where": f"{split}:{number}", "split": split, "problem": problem,
                          **(pair or {}), "prompt_key": prompt_key(pair["prompt"]) if pair else ""})
    return found


def problems(pairs: list[dict[str, Any]], check: str) -> list[str]:
    """What a preference dataset check finds wrong (an empty list: it passes), naming the file line."""
    whole = [p for p in pairs if p["problem"] is None]
    if check == "identical_pairs":
        return [f"{p['where']}: {p['problem']}" for p in pairs if p["problem"] == SAME_ANSWER]
    if check == "pair_structure":
        return [f"{p['where']}: {p['problem']}" for p in pairs if p["problem"] not in (None, SAME_ANSWER)]
    if check == "split_leak":
        splits: dict[str, dict[str, str]] = {}
        for p in whole:
            splits.setdefault(p["prompt_key"], {}).setdefault(p["split"], p["where"])
        return [" and ".join(sorted(seen.values())) for seen in splits.values() if len(seen) > 1]
    raise ValueError(check)


def check_preference_dataset(db: Database, run_id: str | None, check: str) -> tuple[str | None, list[str]]:
    from vbatch_pipelines.curation.dataset import dataset_of_run

    dataset = dataset_of_run(db, run_id, kind=PREFERENCE)
    if dataset is None:
        return None, []
    return dataset.version, problems(exported_pairs(dataset), check)


def load_pairs(dataset: Dataset) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(dataset.path) / "pairs.parquet").to_pylist()
    for row in rows:
        row["prompt"] = json.loads(row["prompt"])
    return rows


def preview(dataset: Dataset, rows: int = 5) -> str:
    return markdown_table(["split", "source", "prompt", "chosen", "rejected"], [
        [p["split"], p["source"], p["prompt"][-1]["content"], p["chosen"], p["rejected"]]
        for p in load_pairs(dataset)[:rows]], width=60)
