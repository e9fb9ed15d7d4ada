"""config/README.md is generated from the schema and must stay in step with it."""

from pathlib import Path

import pytest

from diapipe import cli, docs
from diapipe.config import load_schema

REPO = Path(__file__).resolve().parent.parent
README = REPO / "config" / "README.md"


def _leaves(schema, prefix=""):
    """(dotted key, schema node) for every leaf key of the config schema."""
    props = schema.get("properties")
    if schema.get("type") == "object" and props:
        for name, sub in props.items():
            yield from _leaves(sub, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix, schema


def test_config_readme_is_up_to_date():
    assert README.exists(), "config/README.md missing: run `diapipe config-doc -o config/README.md`"
    assert README.read_text() == docs.render(), (
        "config/README.md is out of date with the schema: run `diapipe config-doc -o config/README.md`"
    )


def test_every_key_is_documented():
    schema = load_schema()
    leaves = dict(_leaves(schema))
    assert len(leaves) >= 5
    text = docs.render(schema)
    for key, node in leaves.items():
        assert f"`{key}`" in text, f"{key} not in the generated reference"
        assert node.get("description", "").strip(), f"config key {key!r} has no description"
        assert node.get("type") or "enum" in node or "oneOf" in node, f"config key {key!r} has no type"


def test_every_optional_key_has_a_default():
    schema = load_schema()
    required_top = set(schema.get("required", []))
    for key, node in _leaves(schema):
        if key in required_top:
            continue
        assert "default" in node, f"config key {key!r} has no default in the schema"


def test_render_shows_type_default_and_enum():
    schema = {
        "type": "object",
        "description": "toy",
        "properties": {
            "isr": {
                "type": "object",
                "description": "ISR block.",
                "properties": {
                    "order": {"type": "integer", "minimum": 0, "default": 1, "description": "Overscan order."},
                    "mode": {"type": "string", "enum": ["a", "b|c"], "default": "a", "description": "Mode."},
                },
            }
        },
    }
    text = docs.render(schema)
    assert "| `isr.order` | integer | `1` | >= 0 | Overscan order. |" in text
    # '|' inside a cell is escaped so the table keeps its columns.
    assert "| `isr.mode` | string | `a` | `a`, `b\\|c` | Mode. |" in text


def test_cli_check_and_write(tmp_path, capsys):
    out = tmp_path / "README.md"
    assert cli.main(["config-doc", "-o", str(out)]) == 0
    assert out.read_text() == docs.render()
    assert cli.main(["config-doc", "-o", str(out), "--check"]) == 0
    out.write_text("stale\n")
    assert cli.main(["config-doc", "-o", str(out), "--check"]) == 1
    assert "out of date" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["seed", "inputs.source", "simulate.nx"])
def test_known_keys_listed(key):
    assert f"`{key}`" in docs.render()
