"""dataId -> path, the Butler idea in one table.

The config's ``datasets`` block maps each dataset type to a path template over
dataId keys (visit, detector, band, patch, ...).  Rules and Python code both
go through it, so moving a product is one edit.

>>> b = Butler({"calexp": "results/calexp/{visit}/{detector}.fits"})
>>> str(b.get("calexp", visit=3, detector=1))
'results/calexp/3/1.fits'
"""

from __future__ import annotations

import string
from pathlib import Path


class Butler:
    def __init__(self, datasets: dict[str, str], root=None):
        self.datasets = dict(datasets)
        self.root = Path(root) if root is not None else None

    def template(self, dataset_type: str) -> str:
        try:
            return self.datasets[dataset_type]
        except KeyError:
            raise KeyError(
                f"unknown dataset type {dataset_type!r}; known: {sorted(self.datasets)}"
            ) from None

    def keys(self, dataset_type: str) -> list[str]:
        """dataId keys the dataset type's path needs."""
        return [f for _, f, _, _ in string.Formatter().parse(self.template(dataset_type)) if f]

    def get(self, dataset_type: str, **data_id) -> Path:
        """Path of one dataset; extra dataId keys are ignored, missing ones are an error."""
        missing = [k for k in self.keys(dataset_type) if k not in data_id]
        if missing:
            raise KeyError(f"dataset {dataset_type!r} needs dataId keys {missing}")
        path = Path(self.template(dataset_type).format(**data_id))
        return self.root / path if self.root is not None else path


_default: Butler | None = None


def get(dataset_type: str, config: dict | None = None, **data_id) -> Path:
    """Path of a dataset from the config's ``datasets`` table (default config if none given)."""
    global _default
    if config is not None:
        return Butler(config["datasets"]).get(dataset_type, **data_id)
    if _default is None:
        from .config import load_schema

        schema = load_schema()
        _default = Butler(schema["properties"]["datasets"]["default"])
    return _default.get(dataset_type, **data_id)
