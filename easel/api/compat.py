"""What Wiro's official clients send, made to mean what their users meant — before validation.

- **Zero means "unset"** for a numeric input when 0 is not a value the input can take
  (``samples``, ``steps``, ``width``, ``height``: their minimum is above 0) and for the guidance
  ``scale``: the n8n nodes send every number field the user left empty as ``0``, so such a 0
  takes the tool's default. Inputs where 0 is a real choice keep it (``clipSkip`` 0 = no skip,
  ``highres_denoise``, ``ip_adapter_scale``). To turn classifier-free guidance off send
  ``scale`` 1 (SD applies guidance only above 1).
- **Required inputs** (``prompt``) that are missing or empty answer Wiro's documented
  ``Request parameter [prompt] required``.
- **The polling samples of ``code-examples.md``** read ``data.taskid`` from the Run answer, send
  it back as ``tasktoken`` and read ``data.status`` (``end``, ``error``, ``cancel``) and
  ``data.output`` from Task/Detail, while every other page shows the flat answers Easel gives.
  Both answers also carry that ``data`` object (:func:`run_data`, :func:`detail_data`); the flat
  fields are untouched. A numeric ``tasktoken`` that is no task's token is read as a task id
  (:func:`easel.api.views.find_task`).
"""
from __future__ import annotations

from typing import Any

from easel.catalog import ToolSpec

from .errors import WiroError
from .toolinfo import REQUIRED

ZERO_MEANS_DEFAULT = {"scale"}  # besides every numeric input whose minimum is above 0


def _is_zero(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, str):
        try:
            return value.strip() != "" and float(value) == 0
        except ValueError:
            return False
    return False


def zero_means_default(spec: ToolSpec, fields: dict) -> dict:
    """A copy of ``fields`` without the zeros that stand for "unset" (so the defaults apply)."""
    out = dict(fields)
    for i in spec.inputs:
        if i.type not in ("number", "float") or i.name not in out or not _is_zero(out[i.name]):
            continue
        if (i.min is not None and i.min > 0) or i.name in ZERO_MEANS_DEFAULT:
            del out[i.name]
    return out


def require_inputs(spec: ToolSpec, fields: dict) -> None:
    """Raise Wiro's ``Request parameter [name] required`` for a missing or empty required input."""
    for i in spec.inputs:
        if i.name not in REQUIRED:
            continue
        value = fields.get(i.name)
        if value is None or (isinstance(value, str) and not value.strip()) or value == []:
            raise WiroError(0, f"Request parameter [{i.name}] required")


# Task status → the simple status the code-examples.md samples test (docs/api.md, "data")
SIMPLE_STATUS = {"task_queue": "queue", "task_cancel": "cancel"}


def simple_status(status: str, pexit: str) -> str:
    """``queue``, ``running``, ``end`` (finished with ``pexit`` "0"), ``error`` (finished with
    another ``pexit``) or ``cancel`` for a task's ``status`` and ``pexit``."""
    if status == "task_postprocess_end":
        return "end" if pexit == "0" else "error"
    return SIMPLE_STATUS.get(status, "running")


def run_data(answer: dict) -> dict:
    """The Run answer with ``data: {taskid, socketaccesstoken}`` added."""
    return {**answer, "data": {"taskid": answer["taskid"], "socketaccesstoken": answer["socketaccesstoken"]}}


def detail_data(answer: dict) -> dict:
    """Task/Detail's answer with ``data: {taskid, socketaccesstoken, status, output}`` added, where
    ``status`` is :func:`simple_status` and ``output`` the output files' URLs."""
    task = answer["tasklist"][0]
    return {**answer, "data": {"taskid": task["id"], "socketaccesstoken": task["socketaccesstoken"],
                               "status": simple_status(task["status"], task["pexit"]),
                               "output": [o["url"] for o in task["outputs"]]}}
