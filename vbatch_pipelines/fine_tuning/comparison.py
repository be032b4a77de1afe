"""Base vs fine-tuned on held-out gold stars: the eval requests, the metrics, the side-by-side table and
the deploy gate.

Metrics per model: exact match (after trimming), normalised match (case, whitespace and punctuation
folded), mean answer length in characters, and, with a judge model configured, the fine-tune's win rate
(ties count half) from an LLM judge that sees the gold answer. On preference pairs (a DPO job) the gold answer is
the chosen one, and two more say whether answers moved away from the rejected one: its normalised match
(``rejected_match``, lower is better) and the share of answers closer to the chosen answer than to the rejected
one (``closer_to_chosen``, by difflib's similarity ratio). The trainer's held-out preference accuracy (chosen
likelier than rejected) is added by the asset.
"""

from __future__ import annotations

import difflib
import json
import string
from pathlib import Path
from typing import Any, Literal, get_args

GateMetric = Literal["exact_match", "normalized_match", "mean_length", "judge_win_rate"]
DeployGate = Literal["always", "no_worse", "never"]  # no_worse: the comparison must not be worse
DEPLOY_GATES: tuple[str, ...] = get_args(DeployGate)
METRICS: tuple[str, ...] = get_args(GateMetric)
HIGHER_IS_BETTER = {"exact_match": True, "normalized_match": True, "judge_win_rate": True, "rejected_match": False}
PREFERENCE_METRICS = ("preference_accuracy", "rejected_match", "closer_to_chosen")
_PUNCT = str.maketrans("", "", string.punctuation)

JUDGE_PROMPT = """You compare two answers to the same conversation against a reference answer written by an \
expert. Reply with exactly one letter: A if answer A is better, B if answer B is better, T if they are equally good.

Conversation:
{conversation}

Reference answer:
{gold}

Answer A:
{a}

Answer B:
{b}

Better answer (A, B or T):"""


def normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def eval_items(eval_path: Path) -> list[dict[str, Any]]:
    """Each eval example as (prompt messages, gold answer): a chat example's conversation up to its last assistant
    turn, or a preference pair's prompt with its chosen answer as gold (and its rejected one)."""
    items = []
    with open(eval_path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if "chosen" in row:  # TRL's preference format (a DPO job's data)
                items.append({"custom_id": f"eval-{len(items)}", "messages": row["prompt"],
                              "gold": row["chosen"][0]["content"], "rejected": row["rejected"][0]["content"]})
                continue
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            items.append({"custom_id": f"eval-{len(items)}", "messages": messages[:last],
                          "gold": messages[last]["content"]})
    return items


def answer_budget(items: list[dict[str, Any]]) -> int:
    """max_tokens for answering ``items``: room for the longest gold answer (in characters), within 16..512."""
    return max(16, min(512, max(len(i["gold"]) for i in items)))


def request_lines(items: list[dict[str, Any]], model: str, max_tokens: int) -> list[dict[str, Any]]:
    return [{"custom_id": item["custom_id"], "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": item["messages"], "max_tokens": max_tokens, "temperature": 0}}
            for item in items]


def judge_lines(items: list[dict[str, Any]], base: dict[str, str], tuned: dict[str, str],
                judge_model: str) -> list[dict[str, Any]]:
    """Each pair asked twice with the order swapped, so the judge's position bias cancels out."""
    lines = []
    for item in items:
        conversation = "\n".join(f"{m['role']}: {m['content']}" for m in item["messages"])
        for order, (a, b) in (("tb", (tuned, base)), ("bt", (base, tuned))):
            prompt = JUDGE_PROMPT.format(conversation=conversation, gold=item["gold"],
                                         a=a.get(item["custom_id"], ""), b=b.get(item["custom_id"], ""))
            lines.append({"custom_id": f"{item['custom_id']}:{order}", "method": "POST",
                          "url": "/v1/chat/completions",
                          "body": {"model": judge_model, "messages": [{"role": "user", "content": prompt}],
                                   "max_tokens": 2, "temperature": 0}})
    return lines


def judge_win_rate(verdicts: dict[str, str]) -> tuple[float | None, dict[str, int]]:
    """The fine-tune's share of wins (ties half) over the verdicts the judge gave in a usable form."""
    counts = {"fine_tuned": 0, "base": 0, "tie": 0, "unparsed": 0}
    for key, text in verdicts.items():
        letter = (text.strip()[:1] or "?").upper()
        tuned_is_a = key.endswith(":tb")
        if letter == "T":
            counts["tie"] += 1
        elif letter in ("A", "B"):
            counts["fine_tuned" if (letter == "A") == tuned_is_a else "base"] += 1
        else:
            counts["unparsed"] += 1
    decided = counts["fine_tuned"] + counts["base"] + counts["tie"]
    if not decided:
        return None, counts
    return round((counts["fine_tuned"] + counts["tie"] / 2) / decided, 4), counts


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, normalize(a), normalize(b)).ratio()


def score(items: list[dict[str, Any]], answers: dict[str, str]) -> dict[str, float]:
    n = len(items) or 1
    scores = {
        "exact_match": round(sum(answers.get(i["custom_id"], "").strip() == i["gold"].strip() for i in items) / n, 4),
        "normalized_match": round(sum(normalize(answers.get(i["custom_id"], "")) == normalize(i["gold"])
                                      for i in items) / n, 4),
        "mean_length": round(sum(len(answers.get(i["custom_id"], "")) for i in items) / n, 1),
    }
    pairs = [i for i in items if "rejected" in i]
    if pairs:
        answer = {i["custom_id"]: answers.get(i["custom_id"], "") for i in pairs}
        scores["rejected_match"] = round(sum(normalize(answer[i["custom_id"]]) == normalize(i["rejected"])
                                             for i in pairs) / len(pairs), 4)
        scores["closer_to_chosen"] = round(sum(
            similarity(answer[i["custom_id"]], i["gold"]) > similarity(answer[i["custom_id"]], i["rejected"])
            for i in pairs) / len(pairs), 4)
    return scores


def side_by_side(items: list[dict[str, Any]], base: dict[str, str], tuned: dict[str, str],
                 limit: int = 20) -> list[dict[str, Any]]:
    rows = []
    for item in items[:limit]:
        b, t = base.get(item["custom_id"], ""), tuned.get(item["custom_id"], "")
        rows.append({"prompt": item["messages"][-1]["content"] if item["messages"] else "", "gold": item["gold"],
                     "base": b, "fine_tuned": t, "base_match": normalize(b) == normalize(item["gold"]),
                     "fine_tuned_match": normalize(t) == normalize(item["gold"])})
    return rows


def markdown(summary: dict[str, Any]) -> str:
    def cell(text: Any, width: int = 80) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")[:width]

    lines = ["| metric | base | fine-tuned |", "|---|---|---|"]
    for metric in METRICS + PREFERENCE_METRICS:
        if metric in summary["base"] or metric in summary["fine_tuned"]:
            lines.append(f"| {metric} | {summary['base'].get(metric, '')} | {summary['fine_tuned'].get(metric, '')} |")
    lines += ["", "| prompt | gold | base | fine-tuned |", "|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {cell(row['prompt'])} | {cell(row['gold'])} | "
                     f"{'✅ ' if row['base_match'] else ''}{cell(row['base'])} | "
                     f"{'✅ ' if row['fine_tuned_match'] else ''}{cell(row['fine_tuned'])} |")
    return "\n".join(lines)


def gate(summary: dict[str, Any] | None, policy: str, metric: str) -> tuple[bool, str]:
    """Whether a fine-tune deploys under ``policy`` (always | no_worse | never), and why."""
    if policy == "always":
        return True, "deploy policy: always"
    if policy == "never":
        return False, "deploy policy: never"
    if policy != "no_worse":
        raise ValueError(f"deploy policy must be always, no_worse or never, got {policy!r}")
    if summary is None or not summary.get("examples"):
        return False, "no held-out eval examples to compare on; not deployed under the no_worse gate"
    base, tuned = summary["base"].get(metric), summary["fine_tuned"].get(metric)
    if metric == "judge_win_rate":
        if tuned is None:
            return False, "no judge verdicts; not deployed under the no_worse gate"
        return (tuned >= 0.5, f"judge win rate {tuned} {'≥' if tuned >= 0.5 else '<'} 0.5")
    if base is None or tuned is None:
        raise ValueError(f"unknown gate metric {metric!r}; use one of {', '.join(METRICS)}")
    better = tuned >= base if HIGHER_IS_BETTER.get(metric, True) else tuned <= base
    return better, f"{metric}: fine-tuned {tuned} vs base {base} ({'no worse' if better else 'worse'})"
