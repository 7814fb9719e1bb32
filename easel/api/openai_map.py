"""How an OpenAI Images API request maps onto an Easel tool: model names, OpenAI's request fields,
tool fields passed through ``extra_body``, and OpenAI's error shape.

Pure functions over a :class:`~easel.catalog.ToolSpec` and its catalog file's ``openai`` block::

    "openai": {"aliases": ["sd-lora", "sd"], "endpoint": "generations",
               "fields": {"prompt": "prompt", "n": "samples", "size": ["width", "height"]},
               "images": []}

``endpoint`` is ``generations`` (text to image) or ``edits`` (the uploaded ``image`` files fill the
tool inputs named in ``images``, in order); ``fields`` maps OpenAI's ``prompt``, ``n`` and ``size``
onto the tool's Wiro inputs (a tool without ``size`` there takes only ``size: auto``). Every
other body key must be one of the tool's own Wiro input names (or a selected model's generate
setting, or ``callbackUrl``): those pass to the Run unchanged and are validated by it. Reference:
OpenAI's Images API (``openai`` Python and Node clients, ``ImageGenerateParams`` /
``ImageEditParams``, ``ImagesResponse``, ``ImageGenStreamEvent``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from easel.catalog import ModelCatalog, ToolSpec

# OpenAI's request fields per endpoint (the current reference); anything else is a tool field
GENERATION_FIELDS = frozenset({"model", "prompt", "n", "size", "response_format", "output_format",
                               "output_compression", "background", "moderation", "quality", "style", "user",
                               "stream", "partial_images"})
EDIT_FIELDS = frozenset({"image", "mask", "model", "prompt", "n", "size", "response_format", "output_format",
                         "output_compression", "background", "quality", "user", "stream", "partial_images",
                         "input_fidelity"})
# OpenAI fields Easel accepts only with the values that ask for nothing it lacks: field → (values, why)
LIMITED = {
    "quality": (("auto", "standard"), "Easel's tools have no quality levels; set the tool's `steps` in extra_body "
                                      "instead"),
    "background": (("auto", "opaque"), "Easel's tools make opaque images only"),
    "moderation": (("auto", "low"), "Easel does not moderate images"),
    "style": ((), "no Easel tool has styles; describe the style in the prompt"),
    "input_fidelity": ((), "no Easel tool has an input fidelity setting"),
    "mask": ((), "no Easel tool takes a mask"),
}
RESPONSE_FORMATS = ("url", "b64_json")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
PASS_THROUGH = ("callbackUrl",)  # Run fields that are no tool input but a Run takes (webhooks)
_SIZE = re.compile(r"^\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,5})\s*$")
_WIRO_FIELD = re.compile(r"Request (?:parameter|files) \[([^\]]+)\]")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``
    with HTTP ``status``. ``retry``: whether the official clients may retry it (sent as
    ``x-should-retry``, which they honour; a retried generation would start a second task)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None, retry: bool | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})
        if retry is not None:
            self.headers["x-should-retry"] = "true" if retry else "false"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class MappedRequest:
    """An OpenAI request mapped onto a tool: the Run's Wiro ``fields``, the uploads per tool input
    (``images``: list of ``(tool input, filename, bytes)``) and how to answer."""

    spec: ToolSpec
    fields: dict[str, Any]
    images: list[tuple[str, str, bytes]] = field(default_factory=list)
    n: int = 1
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int = 100
    stream: bool = False
    partial_images: int = 0
    size: str | None = None


def openai_tools(tools: dict[str, ToolSpec]) -> list[ToolSpec]:
    """The implemented tools whose catalog file has an ``openai`` block, in catalog order."""
    return [spec for spec in tools.values() if spec.module and spec.openai]


def find_model(tools: dict[str, ToolSpec], model: Any) -> ToolSpec:
    """The tool ``model`` names: its Wiro name ``owner/slug``, its bare slug, or an alias of its
    catalog file (case-insensitive).

    Raises:
        OpenAIError: 400 when ``model`` is missing or not a string, 404 ``model_not_found`` when no tool matches.
    """
    known = openai_tools(tools)
    names = ", ".join(spec.name for spec in known)
    if model is None or (isinstance(model, str) and not model.strip()):
        raise OpenAIError(400, f"Missing required parameter: 'model'. Name a tool: one of {names} "
                               "(or an alias, see GET /v1/models).", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise OpenAIError(400, "Invalid type for 'model': expected a string.", "model", "invalid_type")
    wanted = model.strip().lower()
    for spec in known:
        if wanted in (spec.name.lower(), spec.slug.lower(), *(a.lower() for a in spec.openai.get("aliases", []))):
            return spec
    raise OpenAIError(404, f"The model '{model[:100]}' does not exist on this server. Models: {names} "
                           f"(aliases: {', '.join(a for s in known for a in s.openai.get('aliases', []))}).",
                      "model", "model_not_found")


def model_object(spec: ToolSpec) -> dict:
    """OpenAI's model object for a tool (``id`` its Wiro name; ``aliases`` and ``endpoint`` beyond OpenAI)."""
    return {"id": spec.name, "object": "model", "created": 0, "owned_by": spec.owner,
            "aliases": list(spec.openai.get("aliases", [])), "endpoint": spec.openai.get("endpoint", "generations")}


def tool_fields(spec: ToolSpec, catalog: ModelCatalog) -> set[str]:
    """The Wiro field names a request may pass through ``extra_body``: the tool's inputs, the
    generate settings of every catalog model its selects offer, and :data:`PASS_THROUGH`."""
    names = {i.name for i in spec.inputs} | set(PASS_THROUGH)
    for i in spec.inputs:
        if i.type in ("select", "multiselect"):
            for option in i.options:
                entry = catalog.entries.get(str(option.get("model", "")))
                if entry is not None:
                    names |= {gs["id"] for gs in entry.generatesettings}
    return names


def wiro_to_openai_param(spec: ToolSpec, wiro_field: str) -> str:
    """The OpenAI request field that filled ``wiro_field`` (``samples`` → ``n``, ``width`` →
    ``size``, an image input → ``image``), else the Wiro name itself (an ``extra_body`` key)."""
    mapping = spec.openai.get("fields", {})
    for openai_name, target in mapping.items():
        if wiro_field == target or (isinstance(target, list) and wiro_field in target):
            return openai_name
    if wiro_field in spec.openai.get("images", []):
        return "image"
    return wiro_field


def param_of_message(spec: ToolSpec, message: str) -> str | None:
    """The OpenAI field a Wiro validation message (``Request parameter [width] ...``) is about."""
    m = _WIRO_FIELD.search(message)
    return wiro_to_openai_param(spec, m.group(1)) if m else None


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise OpenAIError(400, f"Invalid type for '{name}': expected an integer.", name, "invalid_type")
    try:
        number = int(str(value).strip()) if not isinstance(value, float) or value.is_integer() else None
    except ValueError:
        number = None
    if number is None:
        raise OpenAIError(400, f"Invalid type for '{name}': expected an integer, got {str(value)[:40]!r}.", name,
                          "invalid_type")
    if not lo <= number <= hi:
        raise OpenAIError(400, f"Invalid '{name}': integer above or below range. Expected a value between {lo} "
                               f"and {hi}, got {number}.", name, "integer_out_of_range")
    return number


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0", ""):
        return False
    raise OpenAIError(400, f"Invalid type for '{name}': expected a boolean.", name, "invalid_type")


def _choice(value: Any, name: str, allowed: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or value not in allowed:
        raise OpenAIError(400, f"Invalid value: '{str(value)[:60]}'. Supported values are: "
                               f"{', '.join(repr(a) for a in allowed)}.", name, "invalid_value")
    return value


def _size_range(spec: ToolSpec, names: list[str]) -> str:
    try:
        ranges = [spec.input(n) for n in names]
    except KeyError:
        return ""
    parts = [f"{i.name} {i.min:g}..{i.max:g}" + (f" in steps of {i.multiple_of}" if i.multiple_of else "")
             for i in ranges if i.min is not None and i.max is not None]
    return f" ({', '.join(parts)})" if parts else ""


def map_request(spec: ToolSpec, raw: dict[str, Any], endpoint: str, catalog: ModelCatalog,
                uploads: list[tuple[str, bytes]] = ()) -> MappedRequest:
    """Map an OpenAI request body onto ``spec``'s Wiro fields.

    Args:
        spec: The tool ``raw["model"]`` named (:func:`find_model`).
        raw: The request's fields (JSON, or multipart text fields as strings); ``extra_body`` keys
            arrive at the top level (that is where the official clients put them), or nested
            under ``extra_body`` for a hand-written request.
        endpoint: ``generations`` or ``edits``.
        catalog: For the generate settings a tool's model options add.
        uploads: ``(filename, bytes)`` of the ``image`` / ``image[]`` files, in order (edits).

    Returns:
        The :class:`MappedRequest`; its ``fields`` go to a Run unchanged (validated there).

    Raises:
        OpenAIError: 400 naming the field: a missing ``prompt``, a value out of OpenAI's range, an
            unsupported field or value (:data:`LIMITED`), a ``size`` the tool cannot take, the
            wrong endpoint for the tool, too many or no images, an unknown field.
    """
    raw = {k: v for k, v in raw.items() if v is not None}
    nested = raw.pop("extra_body", None)
    if isinstance(nested, dict):
        raw = {**{k: v for k, v in nested.items() if v is not None}, **raw}
    elif nested is not None:
        raise OpenAIError(400, "Invalid type for 'extra_body': expected an object of tool fields.", "extra_body",
                          "invalid_type")
    own = spec.openai.get("endpoint", "generations")
    if own != endpoint:
        use = "POST /v1/images/edits (client.images.edit)" if own == "edits" else \
            "POST /v1/images/generations (client.images.generate)"
        raise OpenAIError(400, f"The model '{spec.name}' "
                               f"{'edits the images you upload' if own == 'edits' else 'makes images from text'}: "
                               f"use {use}.", "model", "unsupported_model_for_endpoint")
    known = GENERATION_FIELDS if endpoint == "generations" else EDIT_FIELDS
    mapping = spec.openai.get("fields", {})
    slots = list(spec.openai.get("images", []))
    mapped = {t for v in mapping.values() for t in (v if isinstance(v, list) else [v])}
    allowed_extra = tool_fields(spec, catalog)
    for name, (values, why) in LIMITED.items():
        if name in raw and name in known and raw[name] not in values:
            accepted = f" (accepted: {', '.join(repr(v) for v in values)})" if values else ""
            raise OpenAIError(400, f"'{name}' = {str(raw[name])[:60]!r} is not supported: {why}{accepted}.", name,
                              "unsupported_parameter" if not values else "unsupported_value")
    fields: dict[str, Any] = {}
    for name, value in raw.items():
        if name in known:
            continue
        if name not in allowed_extra:
            raise OpenAIError(400, f"Unrecognized request argument supplied: {name}. Besides OpenAI's fields, "
                                   f"'{spec.name}' takes its own Wiro fields (in extra_body): "
                                   f"{', '.join(sorted(allowed_extra - mapped))}.", name,
                              "unknown_parameter")
        if name in mapped:
            openai_name = wiro_to_openai_param(spec, name)
            raise OpenAIError(400, f"'{name}' is set through OpenAI's '{openai_name}': send '{openai_name}' instead.",
                              name, "duplicate_parameter")
        fields[name] = value
    prompt = raw.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise OpenAIError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise OpenAIError(400, "Invalid type for 'prompt': expected a string.", "prompt", "invalid_type")
    if "prompt" in mapping:
        fields[mapping["prompt"]] = prompt
    out = MappedRequest(spec=spec, fields=fields)
    out.n = _int(raw.get("n", 1), "n", 1, 10)
    if "n" in mapping:
        samples = spec.input(mapping["n"])
        if samples.max is not None and out.n > samples.max:
            raise OpenAIError(400, f"Invalid 'n': '{spec.name}' makes at most {samples.max:g} images per request, "
                                   f"got {out.n}.", "n", "integer_out_of_range")
        fields[mapping["n"]] = out.n
    elif out.n != 1:
        raise OpenAIError(400, f"Invalid 'n': '{spec.name}' makes one image per request.", "n", "integer_out_of_range")
    size = raw.get("size")
    if size is not None and size != "auto":
        target = mapping.get("size")
        m = _SIZE.match(size) if isinstance(size, str) else None
        if not target:
            raise OpenAIError(400, f"Invalid value: '{str(size)[:40]}'. '{spec.name}' makes images at the size of its "
                                   "input image: the only supported value is 'auto'.", "size", "invalid_value")
        if m is None:
            raise OpenAIError(400, f"Invalid value: '{str(size)[:40]}'. Supported values are: 'auto' or "
                                   f"'WIDTHxHEIGHT' within the model's range{_size_range(spec, target)}, e.g. "
                                   "'1024x1024', '1536x1024', '1024x1536', '512x512'.", "size", "invalid_value")
        fields[target[0]], fields[target[1]] = int(m.group(1)), int(m.group(2))
        out.size = f"{int(m.group(1))}x{int(m.group(2))}"
    out.response_format = _choice(raw.get("response_format"), "response_format", RESPONSE_FORMATS, "b64_json")
    out.output_format = _choice(raw.get("output_format"), "output_format", OUTPUT_FORMATS, "png")
    if out.response_format == "url" and out.output_format != "png":
        raise OpenAIError(400, f"Invalid value: '{out.output_format}'. With response_format 'url' the files are "
                               "Easel's stored PNGs: use output_format 'png', or response_format 'b64_json'.",
                          "output_format", "invalid_value")
    out.output_compression = _int(raw.get("output_compression", 100), "output_compression", 0, 100)
    out.stream = _bool(raw.get("stream", False), "stream")
    out.partial_images = _int(raw.get("partial_images", 0), "partial_images", 0, 3)
    if endpoint == "edits":
        if "image" in raw:
            raise OpenAIError(400, "Invalid type for 'image': expected a file (multipart 'image' or 'image[]'). An "
                                   f"image URL goes in the tool's own field instead ({', '.join(slots)}).", "image",
                              "invalid_type")
        if not uploads and not any(slot in fields for slot in slots):
            raise OpenAIError(400, "Missing required parameter: 'image'.", "image", "missing_required_parameter")
        if len(uploads) > len(slots):
            raise OpenAIError(400, f"Invalid 'image': '{spec.name}' takes at most {len(slots)} image"
                                   f"{'s' if len(slots) != 1 else ''} ({', '.join(slots)}, in that order), got "
                                   f"{len(uploads)}.", "image", "too_many_images")
        for slot, (filename, data) in zip(slots, uploads):
            if slot in fields:
                raise OpenAIError(400, f"'{slot}' is filled by an uploaded image: leave it out of extra_body.", slot,
                                  "duplicate_parameter")
            out.images.append((slot, filename, data))
    return out


def failure(status: int, message: str, code: str, task_id: int, retry: bool = False) -> OpenAIError:
    """A task's end as an error: the task id in the message and in ``x-easel-task-id``."""
    return OpenAIError(status, message, None, code, headers={"x-easel-task-id": str(task_id)}, retry=retry)
