"""Each tool's example request (the ``example`` object of its catalog file): what ``easel demo``,
the fleet tests and the benchmarks send."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from easel.catalog import ModelCatalog, load_tools
from easel.catalog.examples import Example

TOOLS = load_tools()


@pytest.mark.parametrize("name", sorted(n for n, spec in TOOLS.items() if spec.module))
def test_every_implemented_tool_has_an_example_that_validates_and_ships_its_files(name):
    spec, catalog = TOOLS[name], ModelCatalog.load()
    assert spec.example is not None, f"{name}: no example in its catalog file"
    inputs = spec.validate(dict(spec.example.request), catalog)
    used = {v for v in spec.example.request.values() if isinstance(v, str)}
    for file_name, data in spec.example.read_files().items():
        assert file_name in used, (name, file_name)  # a listed file is one the request names
        Image.open(io.BytesIO(data)).verify()  # an image the API's checks accept
    image_inputs = [i.name for i in spec.inputs if i.accepts == "image" and i.required]
    assert all(inputs[i] in spec.example.files for i in image_inputs), (name, image_inputs)


def test_the_demo_runs_every_tool_with_an_example():
    from easel.cli.demo import demo_tools

    assert set(demo_tools()) == {n for n, spec in TOOLS.items() if spec.module and spec.example is not None}


@pytest.mark.parametrize("data, message", [
    ({"files": {}}, "example.request"),
    ({"request": [], "files": {}}, "example.request"),
    ({"request": {}, "files": ["a.png"]}, "example.files"),
    ({"request": {}, "files": {"a.png": 1}}, "example.files"),
])
def test_a_malformed_example_is_refused_naming_the_field(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        Example.from_json(data, tmp_path)
    assert Example.from_json(None, tmp_path) is None
    assert Example.from_json({"request": {"a": 1}, "files": {"x.png": "examples/x.png"}}, tmp_path).files == {
        "x.png": tmp_path / "examples" / "x.png"}
