"""The Aris REST routes (mounted under /v1 only when Aris is on, behind the API key like the rest):
``POST /v1/sync/victory-to-gold-star`` (Aristotle says a conquest is a VICTORY), ``GET /v1/icl/examples``
(gold-star examples for Eidos' in-context learning, served from vbatch's own DB) and ``GET /v1/aris/conflicts``
(where both sides had changed and Aristotle won)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from functools import lru_cache
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import bindparam, select, update

from api.deps import get_db, get_label_studio
from api.errors import OpenAIError
from api.pagination import paginate
from api.schemas import Page
from integrations.aris.aristotle import Aristotle
from integrations.aris.models import ArisEvent, ArisLink
from integrations.aris.sync import ensure_link, link_new_tasks, sync_pending
from resources import LabelStudio
from vbatch_pipelines.curation.dataset import alpaca_record, chatml_text
from vbatch_pipelines.errors import NotFound, VbatchError
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import CurationTask

router = APIRouter(tags=["aris"])
ICL_CANDIDATES = 1000  # examples ranked by similarity to a query (the newest ones)


async def get_aristotle(request: Request) -> Aristotle:
    return request.app.state.resources["aristotle"]


# -- push: VICTORY -> gold star ------------------------------------------------------------------------


NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: refused here (400), not by the driver (500)


class VictoryRequest(BaseModel):
    conquest_id: str = Field(min_length=1, max_length=256, pattern=NO_NUL)
    philosopher: str = Field(min_length=1, max_length=256, pattern=NO_NUL)
    domain: str = Field(min_length=1, max_length=256, pattern=NO_NUL)
    result_notes: str | None = Field(default=None, max_length=10_000, pattern=NO_NUL)


class VictoryResponse(BaseModel):
    status: Literal["success", "pending"]
    conquest_id: str
    task_id: int | None
    gold_star: bool
    changed: bool
    message: str


@router.post("/sync/victory-to-gold-star", response_model=VictoryResponse, responses={202: {"model": VictoryResponse}})
async def victory_to_gold_star(body: VictoryRequest, db: Database = Depends(get_db),
                               aristotle: Aristotle = Depends(get_aristotle),
                               label_studio: LabelStudio = Depends(get_label_studio)):
    """Aristotle marked a conquest VICTORY: its task becomes a gold star now. The Aristotle row is trusted,
    not the body (which only has to name it: conquest, philosopher and domain must match)."""
    conquest = await asyncio.to_thread(aristotle.get, body.conquest_id)  # down: 503, nothing done
    if conquest is None or (conquest.philosopher, conquest.domain) != (body.philosopher, body.domain):
        raise NotFound(f"No conquest {body.conquest_id!r} of {body.philosopher} in {body.domain}", "conquest_id",
                       "conquest_not_found")
    if not conquest.victory:
        raise OpenAIError(409, f"Conquest {body.conquest_id} is {conquest.result}, not VICTORY", param="conquest_id",
                          code="not_victory")

    def apply() -> tuple[ArisLink, dict[str, int]]:
        link_new_tasks(db)
        ensure_link(db, conquest)
        report = sync_pending(db, aristotle, label_studio, ids=[conquest.id])
        if report.failures:  # Label Studio down (503) or another failure: nothing was changed
            failure = report.failures[0]
            raise failure if isinstance(failure, VbatchError) else RuntimeError(str(failure))
        with db.session() as session:
            return session.get(ArisLink, conquest.id), report.outcomes

    link, outcomes = await asyncio.to_thread(apply)
    if link.ls_task_id is None:
        return JSONResponse(VictoryResponse(
            status="pending", conquest_id=conquest.id, task_id=None, gold_star=False, changed=False,
            message="No curation task is linked to this conquest yet; it becomes a gold star when its result "
                    "arrives").model_dump(), status_code=202)
    changed = bool(outcomes.get("to_vbatch") or outcomes.get("conflict"))
    return VictoryResponse(status="success", conquest_id=conquest.id, task_id=link.ls_task_id, gold_star=True,
                           changed=changed, message="Gold star set from the VICTORY" if changed
                           else "Already a gold star; nothing changed")


# -- conflicts: both sides changed, Aristotle won -------------------------------------------------------


class ArisConflict(BaseModel):
    id: str
    object: Literal["aris.conflict"]
    conquest_id: str
    created_at: int
    winner: str
    task_id: int | None = None
    aristotle_result: str | None = Field(description="the result Aristotle had, which both sides now have")
    aristotle_updated_at: str | None = None
    vbatch_gold_star: bool = Field(description="the gold star vbatch had, undone in favour of Aristotle's")
    vbatch_reviewer: str | None = None
    agreed_gold: bool | None = Field(default=None, description="the gold state both sides last agreed on")
    agreed_result: str | None = None


@router.get("/aris/conflicts", response_model=Page[ArisConflict])
async def list_conflicts(after: str | None = Query(default=None, pattern=r"^[0-9]{1,18}$"),
                         limit: int = Query(default=20, ge=1, le=100), db: Database = Depends(get_db)) -> dict:
    """Where vbatch and Aristotle had both changed a linked conquest since they last agreed: Aristotle's
    state was kept and vbatch's undone. Newest first; ``after`` a conflict's id for the next page."""
    with db.session() as session:
        return paginate(session, ArisEvent, after=int(after) if after else None, limit=limit,
                        where=(ArisEvent.kind == "conflict",))


# -- Eidos: in-context learning examples ---------------------------------------------------------------


class IclExample(BaseModel):
    id: str
    conquest_id: str
    task_id: int
    rating: int | None
    messages: list[dict[str, Any]]
    text: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None


class IclExamples(BaseModel):
    philosopher: str
    domain: str
    conquest_type: str | None
    format: Literal["chatml", "openai", "alpaca"]
    count: int
    examples: list[IclExample]


_WORDS = re.compile(r"\w+")


@lru_cache(maxsize=4)
def _examples_statement(by_type: bool, excluding: bool):
    """The examples query, built once per shape (building it costs more than running it). It walks
    ix_aris_links_examples newest first and joins only the tasks it returns."""
    statement = (select(ArisLink.conquest_id, CurationTask.ls_task_id, CurationTask.rating, CurationTask.messages,
                        CurationTask.response, CurationTask.edited_response)
                 .join(CurationTask, CurationTask.ls_task_id == ArisLink.ls_task_id)
                 .where(ArisLink.philosopher == bindparam("philosopher"), ArisLink.domain == bindparam("domain"),
                        ArisLink.example_since.is_not(None), ArisLink.seen_result == "VICTORY",
                        CurationTask.gold_star.is_(True))
                 .order_by(ArisLink.example_since.desc(), ArisLink.conquest_id.desc())
                 .limit(bindparam("limit")))
    if by_type:
        statement = statement.where(ArisLink.conquest_type == bindparam("conquest_type"))
    if excluding:
        statement = statement.where(ArisLink.conquest_id.not_in(bindparam("exclude", expanding=True)))
    return statement


def _similarity(query: set[str], messages: list[dict[str, Any]]) -> float:
    words = set(_WORDS.findall(" ".join(str(m.get("content", "")) for m in messages).lower()))
    return len(query & words) / len(query | words) if words else 0.0


@router.get("/icl/examples", response_model=IclExamples, response_class=JSONResponse)
async def icl_examples(request: Request, philosopher: str = Query(min_length=1, max_length=256),
                       domain: str = Query(min_length=1, max_length=256),
                       conquest_type: str | None = Query(default=None, max_length=128),
                       limit: int = Query(default=10, ge=1, le=100),
                       format: Literal["chatml", "openai", "alpaca"] = "chatml",
                       query: str | None = Query(default=None, max_length=10_000,
                                                 description="rank examples by similarity to this prompt"),
                       exclude: list[str] = Query(default_factory=list, max_length=1000,
                                                  description="conquest ids to leave out"),
                       db: Database = Depends(get_db)) -> JSONResponse:
    """Gold-star examples of this philosopher and domain (starred tasks linked to VICTORY conquests), newest
    first, the expert's edited answer winning. Served from vbatch's DB: it answers while Aristotle is down.
    Async with one indexed read (~1 ms), as the API's other polled routes: a thread hand-off costs more."""
    params = {"philosopher": philosopher, "domain": domain, "conquest_type": conquest_type, "exclude": exclude,
              "limit": ICL_CANDIDATES if query else limit}
    with db.engine.connect() as connection:
        rows = connection.execute(_examples_statement(bool(conquest_type), bool(exclude)), params).all()
    examples = [(conquest_id, task_id, rating, [*messages, {"role": "assistant",
                                                            "content": edited if edited is not None else response}])
                for conquest_id, task_id, rating, messages, response, edited in rows]
    if query:
        words = set(_WORDS.findall(query.lower()))
        examples.sort(key=lambda e: _similarity(words, e[3]), reverse=True)  # stable: newest first on ties
    examples = examples[:limit]
    if request.app.state.icl_uses.add([e[0] for e in examples]):
        await asyncio.to_thread(request.app.state.icl_uses.flush)
    out = []
    for conquest_id, task_id, rating, messages in examples:
        item: dict[str, Any] = {"id": f"icl-{task_id}", "conquest_id": conquest_id, "task_id": task_id,
                                "rating": rating, "messages": messages}
        if format == "chatml":
            item["text"] = chatml_text(messages)
        elif format == "alpaca":
            record = alpaca_record(messages)
            item.update(instruction=record["instruction"], input=record["input"], output=record["output"])
        out.append(item)
    return JSONResponse({"philosopher": philosopher, "domain": domain, "conquest_type": conquest_type,
                         "format": format, "count": len(out), "examples": out})


class UseCounter:
    """How often each example was served, counted in memory and written at most once a second (and when the
    app stops): a write per request would make every reader wait on the metadata DB's writer."""

    def __init__(self, db: Database, every_s: float = 1.0):
        self.db, self.every_s = db, every_s
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._flushed_at = time.monotonic()

    def add(self, conquest_ids: list[str]) -> bool:
        """Count; True when a flush is due (the caller runs it off the event loop)."""
        with self._lock:
            self._counts.update(conquest_ids)
            return time.monotonic() - self._flushed_at >= self.every_s

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
            self._flushed_at = time.monotonic()
        if not counts:
            return
        stamp = int(time.time())
        table = ArisLink.__table__
        statement = (update(table).where(table.c.conquest_id == bindparam("b_id"))
                     .values(icl_uses=table.c.icl_uses + bindparam("b_n"), icl_last_used_at=stamp))
        with self.db.engine.begin() as connection:
            connection.execute(statement, [{"b_id": c, "b_n": n} for c, n in counts.items()])
