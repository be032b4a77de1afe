"""Training data checked before a fine-tuning job is queued: an uploaded file (OpenAI's chat format for supervised
jobs, its preference format for DPO; refused with the first problems by line number) or a dataset version of the
method's kind (gold stars for supervised, preference pairs for DPO; each with its own eval split). A DPO job's
data is written in TRL's preference format, which the trainer reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vbatch_pipelines.fine_tuning import FineTuningError
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import PREFERENCE, SFT, TRAINER_FORMAT, Dataset, File, of_project

if TYPE_CHECKING:
    from vbatch_pipelines.curation.filters import DatasetFilter

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_REPORTED_ERRORS = 10


KIND_OF_METHOD = {"supervised": SFT, "dpo": PREFERENCE}


def check_training_lines(path: Path, *, param: str, minimum: int, method: str = "supervised") -> int:
    """Count the examples in a fine-tuning file of ``method``'s format, or raise with the first problems by line."""
    from vbatch_pipelines.curation.preferences import parse_line

    problems: list[str] = []
    examples = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            problem = parse_line(raw)[1] if method == "dpo" else _line_problem(raw)
            if problem:
                problems.append(f"line {number}: {problem}")
                if len(problems) >= MAX_REPORTED_ERRORS:
                    break
            else:
                examples += 1
    if problems:
        raise FineTuningError(f"The {param} has invalid examples: " + "; ".join(problems), param,
                              "invalid_training_file" if param == "training_file" else "invalid_validation_file")
    if param == "training_file" and examples < minimum:
        raise FineTuningError(f"The training file has {examples} example(s); at least {minimum} are required "
                              "(VBATCH_MIN_TRAINING_EXAMPLES)", param, "insufficient_examples")
    return examples


def _line_problem(raw: bytes) -> str | None:
    try:
        line = json.loads(raw)
    except ValueError as exc:
        return f"not valid JSON ({exc.msg})"
    if not isinstance(line, dict) or not isinstance(line.get("messages"), list) or not line["messages"]:
        return 'expected an object with a non-empty "messages" list'
    assistant = False
    for i, message in enumerate(line["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{i}] needs a role of {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string"
        if message["role"] == "assistant" and content.strip():
            assistant = True
    if not assistant:
        return "no assistant message with content to learn from"
    return None


def _file(db: Database, file_id: str, param: str, project_id: str) -> File:
    record = of_project(db.get(File, file_id), project_id)
    if record is None:
        raise FineTuningError(f"No file with id {file_id!r}", param, "file_not_found", 404)
    if record.purpose != "fine-tune":
        raise FineTuningError(f"File {file_id} has purpose {record.purpose!r}, not 'fine-tune'", param,
                              "invalid_file_purpose")
    return record


def training_sources(db: Database, training_file: str, validation_file: str | None, *,
                     minimum: int, project_id: str, method: str = "supervised",
                     chosen: DatasetFilter | None = None) -> dict[str, Any]:
    """Where the job's train and eval examples come from (files and datasets of ``project_id``), checked for
    ``method``; a gold-star version's examples only those ``chosen`` passes; raises FineTuningError."""
    dataset = db.get(Dataset, training_file) if not training_file.startswith("file-") else None
    dataset = of_project(dataset, project_id)  # another project's is none of this one's
    if dataset is not None and dataset.status != "ready":  # a build still writing it
        dataset = None
    if dataset is not None:
        wanted = KIND_OF_METHOD[method]
        if dataset.kind != wanted:
            other = next(m for m, kind in KIND_OF_METHOD.items() if kind == dataset.kind)
            raise FineTuningError(f"Dataset {dataset.version} is a {dataset.kind} dataset; a {method} job trains on "
                                  f"a {wanted} dataset (use method {{\"type\": \"{other}\"}} for this one)",
                                  "training_file", "invalid_training_file")
        if validation_file:
            raise FineTuningError("A dataset version brings its own eval split; leave validation_file out",
                                  "validation_file")
        if chosen is not None and chosen.given():
            if dataset.kind != SFT:
                raise FineTuningError("dataset_filter filters gold-star (sft) versions", "dataset_filter")
            return _filtered(dataset, chosen, minimum)
        if dataset.train_examples < minimum:
            raise FineTuningError(
                f"Dataset {dataset.version} has {dataset.train_examples} training example(s); at least "
                f"{minimum} are required (VBATCH_MIN_TRAINING_EXAMPLES)",
                "training_file", "insufficient_examples")
        directory = Path(dataset.path)
        fmt = TRAINER_FORMAT[dataset.kind]
        return {"dataset_version": dataset.version, "train_path": directory / f"train.{fmt}.jsonl",
                "eval_path": directory / f"eval.{fmt}.jsonl" if dataset.eval_examples else None,
                "train_examples": dataset.train_examples, "eval_examples": dataset.eval_examples, "convert": False}
    if chosen is not None and chosen.given():
        raise FineTuningError("dataset_filter filters a gold-star dataset version; training_file is not one",
                              "dataset_filter")
    train = _file(db, training_file, "training_file", project_id)
    train_examples = check_training_lines(Path(train.path), param="training_file", minimum=minimum, method=method)
    eval_path, eval_examples = None, 0
    if validation_file:
        validation = _file(db, validation_file, "validation_file", project_id)
        eval_examples = check_training_lines(Path(validation.path), param="validation_file", minimum=0,
                                             method=method)
        eval_path = Path(validation.path)
    return {"dataset_version": None, "train_path": Path(train.path), "eval_path": eval_path,
            "train_examples": train_examples, "eval_examples": eval_examples, "convert": method == "dpo"}


def _filtered(dataset: Dataset, chosen: DatasetFilter, minimum: int) -> dict[str, Any]:
    """The examples of a gold-star version that ``chosen`` passes, rendered as the trainer reads them."""
    from vbatch_pipelines.curation.dataset import load_examples, render
    from vbatch_pipelines.curation.filters import FilterNotApplicable

    try:
        kept = [e for e in load_examples(dataset) if chosen.matches(e)]
    except FilterNotApplicable as exc:
        raise FineTuningError(f"Dataset {dataset.version}: {exc}", exc.param, exc.code) from exc
    train = [e for e in kept if e["split"] == "train"]
    evals = [e for e in kept if e["split"] == "eval"]
    if len(train) < minimum:
        raise FineTuningError(f"{len(train)} training example(s) of dataset {dataset.version} match dataset_filter; "
                              f"at least {minimum} are required (VBATCH_MIN_TRAINING_EXAMPLES)", "dataset_filter",
                              "insufficient_examples")
    fmt = TRAINER_FORMAT[dataset.kind]
    return {"dataset_version": dataset.version, "train_data": render(train, fmt),
            "eval_data": render(evals, fmt) if evals else None,
            "train_examples": len(train), "eval_examples": len(evals), "convert": False}


def write_training_data(sources: dict[str, Any], directory: Path) -> None:
    """The job's own copy of its train and eval data (``training_sources``'), in ``directory``."""
    for split in ("train", "eval"):
        target = directory / f"{split}.jsonl"
        if sources.get(f"{split}_data") is not None:
            target.write_bytes(sources[f"{split}_data"])
        elif sources.get(f"{split}_path") is not None:
            copy_training_data(sources[f"{split}_path"], target, sources["convert"])


def copy_training_data(source: Path, target: Path, convert: bool) -> None:
    """The job's own copy of its data; an uploaded preference file (checked already) becomes TRL's format."""
    import shutil

    if not convert:
        shutil.copyfile(source, target)
        return
    from vbatch_pipelines.curation.preferences import parse_line, trl_line

    with open(source, "rb") as lines, open(target, "w", encoding="utf-8") as out:
        for raw in lines:
            if raw.strip():
                pair = parse_line(raw)[0]
                out.write(json.dumps(trl_line(pair["prompt"], pair["chosen"], pair["rejected"]),
                                     ensure_ascii=False) + "\n")


def model_max_length(path: str) -> int | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("max_position_embeddings")
