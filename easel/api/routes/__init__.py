"""The HTTP routes, one module per resource, each an ``APIRouter`` (or a function building one
for a path that is a setting): ``run``, ``task``, ``tool``, ``file``, ``socket``, ``openai``,
``playground``, ``metrics`` and ``health``. :func:`easel.api.app.create_app` includes them."""
