"""The review page (``/ui/review``): vbatch's own review queue for experts who would rather not leave the console.
A queue with filters, the task's prompt, its answer editable in place, rating, gold star, keyboard shortcuts and
"next". Every review is written into Label Studio as an annotation through the same function the API uses
(``review_and_tell``), so both tools show the same; with several reviewers per task, the page's reviews are vbatch's
Label Studio user's votes."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import Field

from api.console import console_login, console_role, render
from api.deps import Role, get_label_studio
from api.routers.curation import MAX_BULK, ReviewRequest, review_and_tell, star_many
from api.schemas import StrictBody
from resources import LabelStudio
from vbatch_pipelines.projects import Caller

router = APIRouter(prefix="/ui", include_in_schema=False)
QUEUE_PAGE = 50
# the status filter's choices: (label, list_tasks' filters)
STATUSES = {"to-review": ("To review", {"reviewed": False}), "reviewed": ("Reviewed", {"reviewed": True}),
            "gold": ("Gold stars", {"gold_star": True}), "all": ("All", {})}


class PageStar(StrictBody):
    task_ids: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = Field(min_length=1, max_length=MAX_BULK)
    gold_star: bool = True


@router.get("/review", response_class=HTMLResponse)
def review_page(request: Request, status: str = Query(default="to-review", max_length=16),
                batch_id: str | None = Query(default=None, max_length=64),
                schema: str | None = Query(default=None, max_length=64),
                assignee: str | None = Query(default=None, max_length=256),
                after: int | None = Query(default=None, ge=0, le=2**31 - 1),
                task: int | None = Query(default=None, ge=1, le=2**31 - 1),
                role: Role = Depends(console_role), caller: Caller = Depends(console_login)) -> HTMLResponse:
    from vbatch_pipelines.curation.schemas import SCHEMAS
    from vbatch_pipelines.curation.service import agreement_stats, get_task, list_tasks, with_reviews
    from vbatch_pipelines.store.models import of_project

    db = request.app.state.db
    status = status if status in STATUSES else "to-review"
    filters = {"batch_id": batch_id or None, "schema": schema or None, "assignee": assignee or None}
    queue, has_more = list_tasks(db, caller.project_id, **filters, **STATUSES[status][1], after=after,
                                 limit=QUEUE_PAGE)
    shown = {k: v for k, v in {"status": status, **filters}.items() if v}

    def link(**changes) -> str:
        return "/ui/review?" + urlencode({**shown, **{k: v for k, v in changes.items() if v is not None}})

    ids = [t["id"] for t in queue]
    current = next((t for t in queue if t["id"] == task), None)
    if current is None and task is not None:  # not in this page of the queue (reviewed meanwhile, or filtered)
        found = of_project(get_task(db, task), caller.project_id)
        current = with_reviews(db, [found])[0] if found is not None and found.ls_task_id else None
    if current is None and queue:
        current = queue[0]
    at = ids.index(current["id"]) if current is not None and current["id"] in ids else None
    following = ids[at + 1] if at is not None and at + 1 < len(ids) else None
    next_url = link(after=after, task=following) if following else (link(after=ids[-1]) if has_more else None)
    previous_url = link(after=after, task=ids[at - 1]) if at else None
    return render(request, "review.html", role, queue=queue, current=current, has_more=has_more,
                 more_url=link(after=ids[-1]) if has_more and ids else None, next_url=next_url,
                 previous_url=previous_url, link=link, status=status, statuses=STATUSES, filters=filters,
                 schemas=sorted(SCHEMAS), team=agreement_stats(db, caller.project_id),
                 label_studio_on=request.app.state.resources.label_studio.enabled)


@router.post("/review/tasks/{task_id}")
async def review_from_page(request: Request, body: ReviewRequest, task_id: int = Path(ge=1, le=2**31 - 1),
                           caller: Caller = Depends(console_login),
                           label_studio: LabelStudio = Depends(get_label_studio)) -> dict:
    """The page's save: answer, rating, star (a JSON body from its own script; the session cookie is SameSite)."""
    return await review_and_tell(request, label_studio, request.app.state.db, task_id, caller,
                                 "curation.reviewed", **body.model_dump(exclude_none=True))


@router.post("/review/gold-star")
async def star_from_page(request: Request, body: PageStar, caller: Caller = Depends(console_login),
                         label_studio: LabelStudio = Depends(get_label_studio)) -> dict:
    """The queue's "star the selected" button."""
    data = await star_many(request, label_studio, request.app.state.db, caller, body.task_ids, body.gold_star)
    return {"object": "list", "data": data}
