"""Load and validate the pipeline configuration against its JSON schema.

The schema (``workflow/schemas/config.schema.yaml``) is the single source of
truth: every key has a type, a default and a description; ``config/README.md``
is generated from it (``diapipe config-doc``).  Validation fills defaults, and
a bad config is rejected with the offending key named.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


def load_schema(path=None) -> dict:
    """The full schema, with each stage's block (``$ref: stages/<stage>.schema.yaml``) inlined.

    Parsed once per set of file modification times (YAML parsing of a dozen files costs
    ~50 ms, and validate() is called often); each call returns a fresh deep copy.
    """
    path = Path(path).resolve() if path else SCHEMA_PATH
    files = [path, *sorted((path.parent / "stages").glob("*.yaml"))]
    stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files if f.exists())
    cached = _SCHEMA_CACHE.get(path)
    if cached is None or cached[0] != stamp:
        cached = (stamp, _parse_schema(path))
        _SCHEMA_CACHE[path] = cached
    return copy.deepcopy(cached[1])


_SCHEMA_CACHE: dict = {}


def _parse_schema(path: Path) -> dict:
    with open(path) as fh:
        schema = yaml.safe_load(fh)
    for name, sub in schema.get("properties", {}).items():
        ref = sub.get("$ref") if isinstance(sub, dict) else None
        if ref and not ref.startswith("#"):
            with open(path.parent / ref) as fh:
                schema["properties"][name] = yaml.safe_load(fh)
    return schema


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def validate(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` in place (filling defaults) and return it.

    Raises ConfigError naming the key, e.g. ``config key 'isr.overscan_order':
    'two' is not of type 'integer'``.
    """
    schema = load_schema() if schema is None else schema
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [_describe(e) for e in errors]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    # dataset types a newer diapipe added, missing from an older config's datasets map: their defaults
    defaults = schema.get("properties", {}).get("datasets", {}).get("default")
    if isinstance(defaults, dict) and isinstance(config.get("datasets"), dict):
        for key, value in defaults.items():
            config["datasets"].setdefault(key, value)
    return config


def _describe(error) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        where = f"{path}." if path else ""
        return "unknown config key " + ", ".join(f"'{where}{k}'" for k in extra)
    if error.validator == "required":
        # Not from error.instance: the default-filling validator may have added the
        # key to that (shared) dict after this error was raised.  The message is
        # "'<key>' is a required property".
        missing = [error.message.split("'")[1]] if error.message.count("'") >= 2 else []
        missing = missing or [k for k in error.validator_value if k not in error.instance]
        where = f"{path}." if path else ""
        return "missing config key " + ", ".join(f"'{where}{k}'" for k in missing)
    return f"config key '{path or '<top>'}': {error.message}"


def deep_merge(base: dict, overlay: dict) -> dict:
    """Recursively merge ``overlay`` onto a copy of ``base`` (as snakemake --configfile does)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(*paths) -> dict:
    """Load one or more YAML files (later ones overlay earlier ones) and validate."""
    config: dict = {}
    for path in paths:
        with open(path) as fh:
            config = deep_merge(config, yaml.safe_load(fh) or {})
    return validate(config)
