"""Task schemas: how one kind of batch result is reviewed in Label Studio.

A schema names a Label Studio project (one per schema), gives its labeling config, turns a request and
its response into the task's data, and checks an answer (the structured-output schema validates JSON).
Every config shares the control names below, so reading an annotation back is the same for all schemas.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vbatch_pipelines.protocol import responses_messages

# Control names shared by every labeling config.
ANSWER = "answer"  # editable TextArea, pre-filled with the model's response through a prediction
RATING = "rating"  # 1-5
GOLD = "gold"  # a single "gold star" choice
GOLD_STAR = "gold star"
RESPONSE = "response"  # the Text object the controls annotate


def review_config(prompt_view: str, answer_hint: str) -> str:
    return f"""<View>
  <Header value="Prompt"/>
  {prompt_view}
  <Header value="Model response ($model)"/>
  <Text name="{RESPONSE}" value="$response"/>
  <Header value="{answer_hint}"/>
  <TextArea name="{ANSWER}" toName="{RESPONSE}" editable="true" maxSubmissions="1" rows="6"/>
  <Rating name="{RATING}" toName="{RESPONSE}" maxRating="5"/>
  <Choices name="{GOLD}" toName="{RESPONSE}" choice="single-radio" showInline="true">
    <Choice value="{GOLD_STAR}"/>
  </Choices>
</View>"""


DIALOGUE = '<Paragraphs name="prompt" value="$messages" layout="dialogue" nameKey="role" textKey="content"/>'


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The request as chat messages (a completions prompt becomes one user message; a Responses request's
    instructions and input become the messages vLLM answered)."""
    if "input" in body:
        return responses_messages(body, strict=False)
    if "messages" in body:
        out = []
        for message in body["messages"]:
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
            out.append({"role": str(message.get("role")), "content": content or ""})
        return out
    prompt = body.get("prompt", "")
    return [{"role": "user", "content": prompt if isinstance(prompt, str) else json.dumps(prompt)}]


def validate_json(answer: str) -> str | None:
    try:
        json.loads(answer)
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    return None


@dataclass(frozen=True)
class TaskSchema:
    name: str
    description: str
    label_config: str
    validate: Callable[[str], str | None] = lambda answer: None  # an error message, or None when fine
    id_field: str | None = None  # a task data field that carries the request's custom_id (e.g. conquest_id)

    @property
    def project_title(self) -> str:
        return f"vbatch · {self.name}"


CHAT_REVIEW = TaskSchema(
    name="chat_review",
    description="Review a chat answer: fix it, rate it 1-5, mark the good ones as gold stars.",
    label_config=review_config(DIALOGUE, "Corrected answer (edit the model's text)"),
)

JSON_EXTRACTION = TaskSchema(
    name="json_extraction",
    description="Review structured output: the answer must be valid JSON; fix fields, rate, gold-star.",
    label_config=review_config(DIALOGUE, "Corrected JSON (must parse)"),
    validate=validate_json,
)

SCHEMAS: dict[str, TaskSchema] = {schema.name: schema for schema in (CHAT_REVIEW, JSON_EXTRACTION)}
BUILT_IN = frozenset(SCHEMAS)  # the core's own: no file or extension may redefine them
DEFAULT_SCHEMA = CHAT_REVIEW.name
# Extensions (integrations/) add schemas and rules that pick one from a batch's metadata; the first rule that
# answers wins, before the core's own choice.
SCHEMA_RULES: list[Callable[[dict[str, str]], str | None]] = []


def register_schema(schema: TaskSchema, rule: Callable[[dict[str, str]], str | None] | None = None) -> None:
    """Make a task schema available (idempotent), optionally with a rule naming it for a batch's metadata."""
    SCHEMAS[schema.name] = schema
    if rule is not None and rule not in SCHEMA_RULES:
        SCHEMA_RULES.append(rule)


class UnknownSchema(ValueError):
    pass


def get_schema(name: str | None) -> TaskSchema:
    schema = SCHEMAS.get(name or DEFAULT_SCHEMA)
    if schema is None:
        raise UnknownSchema(f"Unknown task schema {name!r}; known: {', '.join(sorted(SCHEMAS))}")
    return schema


def asks_for_json(body: dict[str, Any]) -> bool:
    """Whether a request asks for a JSON answer: OpenAI's ``response_format`` (a Responses request's
    ``text.format``) of a JSON type, or vLLM's own extensions, ``structured_outputs`` with ``json`` or
    ``json_object``."""
    response_format = body.get("response_format") or (body.get("text") or {}).get("format") or {}
    if response_format.get("type") in ("json_object", "json_schema"):
        return True
    structured = body.get("structured_outputs") or {}
    return isinstance(structured, dict) and (structured.get("json") is not None or bool(structured.get("json_object")))


def schema_for_batch(metadata: dict[str, str] | None, body: dict[str, Any] | None = None) -> TaskSchema:
    """``metadata.curation_schema`` picks the schema; a request that asks for JSON means json_extraction."""
    metadata = metadata or {}
    if metadata.get("curation_schema"):
        return get_schema(metadata["curation_schema"])
    for rule in SCHEMA_RULES:
        if (name := rule(metadata)) is not None:
            return get_schema(name)
    return JSON_EXTRACTION if asks_for_json(body or {}) else CHAT_REVIEW


def prediction(response_text: str) -> dict[str, Any]:
    """Pre-fill the editable answer with the model's response."""
    return {"model_version": "vbatch", "result": [
        {"from_name": ANSWER, "to_name": RESPONSE, "type": "textarea", "value": {"text": [response_text]}},
    ]}


@dataclass(frozen=True)
class Review:
    """What an annotation says: the expert's answer text, rating, gold star."""

    answer: str | None
    rating: int | None
    gold_star: bool


def read_annotation(result: list[dict[str, Any]]) -> Review:
    answer, rating, gold = None, None, False
    for item in result or []:
        value = item.get("value") or {}
        if item.get("from_name") == ANSWER and value.get("text"):
            texts = value["text"]
            answer = "\n".join(texts) if isinstance(texts, list) else str(texts)
        elif item.get("from_name") == RATING and value.get("rating") is not None:
            rating = int(value["rating"])
        elif item.get("from_name") == GOLD:
            gold = GOLD_STAR in (value.get("choices") or [])
    return Review(answer, rating, gold)


def annotation_result(answer: str | None, rating: int | None, gold_star: bool) -> list[dict[str, Any]]:
    """The inverse of read_annotation: the result vbatch writes when a review is made through its API."""
    result: list[dict[str, Any]] = []
    if answer is not None:
        result.append({"from_name": ANSWER, "to_name": RESPONSE, "type": "textarea", "value": {"text": [answer]}})
    if rating is not None:
        result.append({"from_name": RATING, "to_name": RESPONSE, "type": "rating", "value": {"rating": rating}})
    if gold_star:
        result.append({"from_name": GOLD, "to_name": RESPONSE, "type": "choices", "value": {"choices": [GOLD_STAR]}})
    return result
