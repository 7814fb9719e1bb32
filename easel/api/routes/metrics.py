"""``GET /metrics``: the Prometheus exposition of the whole process tree and the store's gauges
(:mod:`easel.api.metrics`). With ``Settings.api.metrics_token`` set it needs
``Authorization: Bearer <token>``; not in the OpenAPI document."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from .. import deps
from ..metrics import exposition
from ..services import Services

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request, svc: Services = Depends(deps.services)):
    token = svc.settings.api.metrics_token
    if token:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return PlainTextResponse("401 Unauthorized: /metrics needs 'Authorization: Bearer <token>' "
                                     "(EASEL_METRICS_TOKEN)\n", 401, headers={"WWW-Authenticate": "Bearer"})
    body = await run_in_threadpool(exposition, svc.store_metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
