"""Cursor pagination as OpenAI's lists do it: ``after`` an object id, ``limit``, ``has_more``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, or_, select

from api.errors import OpenAIError


def paginate(session, model, *, after: str | None, limit: int, order: str = "desc", where=()) -> dict[str, Any]:
    """A list page of ``model`` rows (those ``where`` selects: a project's own) ordered by (created_at, id);
    ``after`` must be an id on the list."""
    if order not in ("asc", "desc"):
        raise OpenAIError(400, "order must be 'asc' or 'desc'", param="order")
    query = select(model).where(*where)
    if after is not None:
        cursor = session.scalars(select(model).where(model.id == after, *where)).first()
        if cursor is None:
            raise OpenAIError(400, f"after: no object with id '{after}'", param="after")
        if order == "desc":
            query = query.where(or_(model.created_at < cursor.created_at,
                                    and_(model.created_at == cursor.created_at, model.id < cursor.id)))
        else:
            query = query.where(or_(model.created_at > cursor.created_at,
                                    and_(model.created_at == cursor.created_at, model.id > cursor.id)))
    if order == "desc":
        query = query.order_by(model.created_at.desc(), model.id.desc())
    else:
        query = query.order_by(model.created_at.asc(), model.id.asc())
    rows = list(session.scalars(query.limit(limit + 1)))
    page = [row.to_openai() for row in rows[:limit]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(rows) > limit}
