"""``GET /healthz`` (the process can serve: workers alive, disk not full) and ``GET /readyz``
(a task would start now: a worker has loaded its tools). Both answer 503 with the reason when not;
neither is in the OpenAPI document."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from .. import deps
from ..services import Services

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
async def healthz(svc: Services = Depends(deps.services)):
    ok, why = svc.executor.health() if svc.executor is not None else (True, "API only (no local workers)")
    full = svc.disk.problem()
    ok, why = (False, full) if full else (ok, why)
    return JSONResponse({"ok": ok, "reason": why}, status_code=200 if ok else 503)


@router.get("/readyz", include_in_schema=False)
async def readyz(svc: Services = Depends(deps.services)):
    """Whether a task would start now: a worker has imported torch and loaded the preloaded
    tools; which tools are warm (``Executor.ready``). 503 until then."""
    info = svc.executor.ready() if svc.executor is not None else {"ready": True, "workers": [], "warm": []}
    return JSONResponse(info, status_code=200 if info["ready"] else 503)
