"""The user's raw exposures from a table (``inputs.source: table``).

A tab-separated table (default ``config/exposures.tsv``; documented example
``config/exposures.example.tsv``) lists one raw FITS file per row:

    path  visit  detector  band  type  mjd  exptime  template

Only ``path`` is a required column.  Where the table is silent (a blank cell or
a missing column) the value comes from the usual FITS header keywords, which
``workflow/schemas/exposures.schema.yaml`` names per column (EXPNUM, DETECTOR
or CCDNUM, FILTER, OBSTYPE or IMAGETYP, MJD-OBS or DATE-OBS, EXPTIME or
EXPOSURE).  Where both give a value they must agree: the table fills what the
headers lack, it does not overrule them (a file in the wrong row is caught at
workflow start, not hours later).  Each resolved row is then validated against
that schema (types, allowed frame types, the columns each frame type needs).

Any problem is one :class:`ExposureTableError` naming the table, the line, the
column and the raw file, e.g.::

    config/exposures.tsv line 7 (raw/v3d1.fits), column 'band': no value in the
    table and no FILTER card in the header

The workflow (``workflow/rules/common.smk``) turns it into a WorkflowError
before any job starts, and resolves the dataset types ``raw``, ``raw_bias``,
``raw_dark`` and ``raw_flat`` (the Butler's dataIds -> paths) through the
table instead of the path templates.

Relative paths are relative to the directory snakemake runs in (like every
other path in the config).
"""

from __future__ import annotations

import csv
import logging
import math
import re
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import yaml

from .fileio import DiapipeError

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "exposures.schema.yaml"

#: Columns of the resolved table, in order.
COLUMNS = ["path", "visit", "detector", "band", "type", "mjd", "exptime", "template", "seq", "npix", "line"]
#: Frame types, and the dataset type of the Butler each one is.
DATASET_OF_TYPE = {"object": "raw", "bias": "raw_bias", "dark": "raw_dark", "flat": "raw_flat"}

_INT_COLS = ("visit", "detector")
_FLOAT_COLS = ("mjd", "exptime")
_TRUE = {"true", "yes", "y", "1", "t"}
_FALSE = {"false", "no", "n", "0", "f"}


class ExposureTableError(DiapipeError):
    """Bad exposures table: the message names the table, the line and the column."""


# ------------------------------------------------------------------ schema
_SCHEMA_CACHE: dict = {}


def load_schema(path=None) -> dict:
    """The row schema (YAML), parsed once."""
    path = Path(path or SCHEMA_PATH)
    if path not in _SCHEMA_CACHE:
        with open(path) as fh:
            _SCHEMA_CACHE[path] = yaml.safe_load(fh)
    return _SCHEMA_CACHE[path]


def header_keywords(schema: dict | None = None) -> dict[str, list[str]]:
    """column -> FITS header keywords read when the table is silent (from the schema)."""
    schema = schema or load_schema()
    return {c: list(p.get("header", [])) for c, p in schema["properties"].items() if p.get("header")}


def normalize_type(value) -> str:
    """A camera's OBSTYPE/IMAGETYP spelling -> object, bias, dark or flat (else returned lower-cased).

    'zero' is a bias; 'science' and 'light' frames are objects; any '*flat*'
    (dome, sky, twilight) is a flat.
    """
    v = str(value).strip().lower()
    if "bias" in v or "zero" in v:
        return "bias"
    if "dark" in v:
        return "dark"
    if "flat" in v:
        return "flat"
    if v in ("object", "science", "sci", "light", "light frame", "obj"):
        return "object"
    return v


# ----------------------------------------------------------------- reading
def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(column names, [(line number, cells)]) of a TSV; '#' lines and blank lines skipped."""
    try:
        with open(path, newline="") as fh:
            lines = list(enumerate(fh, start=1))
    except OSError as exc:
        raise ExposureTableError(f"cannot read the exposures table ({exc.strerror or exc})", path) from None
    rows = [(n, next(csv.reader([ln], delimiter="\t"))) for n, ln in lines
            if ln.strip() and not ln.lstrip().startswith("#")]
    if not rows:
        raise ExposureTableError("the exposures table has no header line (tab-separated: path, visit, "
                                 "detector, band, type, mjd, exptime)", path)
    (hline, header), body = rows[0], rows[1:]
    header = [h.strip() for h in header]
    known = list(load_schema()["properties"])
    unknown = [h for h in header if h not in known]
    if unknown:
        raise ExposureTableError(f"line {hline}: unknown column(s) {unknown}; known columns are {known} "
                                 "(tab-separated)", path)
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise ExposureTableError(f"line {hline}: column(s) {dup} appear twice", path)
    if "path" not in header:
        raise ExposureTableError(f"line {hline}: the table needs a 'path' column (has {header})", path)
    for n, cells in body:
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
            raise ExposureTableError(f"line {n}: {len(cells)} cells but {len(header)} columns "
                                     "(tabs in the wrong place?)", path)
    return header, body


def _where(table, line, raw_path=None) -> str:
    return f"{table} line {line}" + (f" ({raw_path})" if raw_path else "")


def _convert(value: str, column: str, where: str):
    """A table cell (string) -> the column's Python type; ExposureTableError naming the column if not."""
    v = value.strip()
    try:
        if column in _INT_COLS:
            f = float(v)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if column in _FLOAT_COLS:
            f = float(v)
            if not math.isfinite(f):
                raise ValueError
            return f
    except ValueError:
        kind = "an integer" if column in _INT_COLS else "a number"
        raise ExposureTableError(f"{where}, column '{column}': {v!r} is not {kind}") from None
    if column == "template":
        if v.lower() in _TRUE:
            return True
        if v.lower() in _FALSE:
            return False
        raise ExposureTableError(f"{where}, column 'template': {v!r} is not true/false (or yes/no, 1/0)")
    if column == "type":
        return normalize_type(v)
    return v


def read_header(path) -> dict:
    """Primary header merged with the first image extension's (as ISR reads raws)."""
    from astropy.io import fits

    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        header = dict(hdul[0].header)
        if hdul[0].data is None and len(hdul) > 1:
            header.update(dict(hdul[1].header))
    return header


def _from_header(header: dict, column: str, keys: list[str], where: str):
    """(value, keyword) of the first keyword present and non-blank; (None, None) if none is."""
    for k in keys:
        if k in header and header[k] not in (None, ""):
            raw = header[k]
            try:
                if column in _INT_COLS:
                    return int(raw), k
                if column in _FLOAT_COLS:
                    return float(raw), k
            except (TypeError, ValueError):
                raise ExposureTableError(f"{where}, column '{column}': header {k}={raw!r} is not a number") from None
            if column == "type":
                return normalize_type(raw), k
            return str(raw).strip(), k
    if column == "mjd" and header.get("DATE-OBS"):
        from astropy.time import Time

        try:
            return float(Time(str(header["DATE-OBS"]), scale="utc").mjd), "DATE-OBS"
        except ValueError:
            raise ExposureTableError(f"{where}, column 'mjd': header DATE-OBS={header['DATE-OBS']!r} "
                                     "is not a date") from None
    return None, None


def _agree(column, table_value, header_value) -> bool:
    if column == "mjd":
        return abs(table_value - header_value) < 1e-5  # ~1 s
    if column == "exptime":
        return abs(table_value - header_value) <= 1e-3 * max(1.0, abs(header_value))
    return str(table_value) == str(header_value)


def _schema_message(err: jsonschema.ValidationError, resolved: dict, source: dict) -> tuple[str, str]:
    """(column, message) of a row schema error."""
    if err.validator == "required":
        m = re.search(r"'([^']+)' is a required property", err.message)
        col = m.group(1) if m else "?"
        keys = header_keywords().get(col)
        hint = f" and no {' or '.join(keys)} card in the header" if keys else ""
        kind = resolved.get("type")
        what = f"{'an' if kind == 'object' else 'a'} {kind} frame needs it: no value in the table{hint}"
        return col, what
    col = str(err.absolute_path[0]) if err.absolute_path else "?"
    origin = f" (from header {source[col]})" if source.get(col) else ""
    return col, f"{err.message}{origin}"


def resolve_row(cells: dict[str, str], table, line: int, schema: dict | None = None,
                check_headers: bool = True) -> dict:
    """One table row -> resolved and validated record (blank cells filled from the FITS header)."""
    schema = schema or load_schema()
    raw_path = cells.get("path", "").strip()
    where = _where(table, line, raw_path or None)
    if not raw_path:
        raise ExposureTableError(f"{where}, column 'path': empty")
    rec, source = {}, {}
    for col, value in cells.items():
        if col != "path" and value.strip() != "":
            rec[col] = _convert(value, col, where)
    rec["path"] = raw_path
    # The table's own cells first (an unknown frame type is the table's error, not a header clash).
    for col, value in rec.items():
        err = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema["properties"][col]).iter_errors(value))
        if err is not None:
            raise ExposureTableError(f"{where}, column '{col}': {err.message}")
    if not Path(raw_path).is_file():
        raise ExposureTableError(f"{where}, column 'path': no such file (relative paths are relative to "
                                 f"the directory snakemake runs in, here {Path.cwd()})")
    if check_headers:
        try:
            header = read_header(raw_path)
        except (OSError, ValueError, IndexError) as exc:
            raise ExposureTableError(f"{where}, column 'path': cannot read FITS header ({exc})") from None
        for col, keys in header_keywords(schema).items():
            value, key = _from_header(header, col, keys, where)
            if value is None:
                continue
            if col not in rec:
                rec[col], source[col] = value, key
            elif not _agree(col, rec[col], value):
                raise ExposureTableError(f"{where}, column '{col}': the table says {rec[col]!r} but the header "
                                         f"says {key}={value!r} (wrong file in this row?)")
    # A calibration frame has no visit, and a bias or dark no band, whatever its EXPNUM or FILTER card says.
    unused = {"bias": ("visit", "band"), "dark": ("visit", "band"), "flat": ("visit",)}.get(rec.get("type"), ())
    for col in unused:
        if col in source:
            del rec[col], source[col]
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(rec), key=lambda e: e.validator != "enum")
    if errors:
        col, msg = _schema_message(errors[0], rec, source)
        raise ExposureTableError(f"{where}, column '{col}': {msg}")
    if rec.get("template") and rec["type"] != "object":
        raise ExposureTableError(f"{where}, column 'template': only object frames go into templates")
    if check_headers:
        # Pixels of the raw image (overscan included): the workflow sizes job memory from it.
        rec["npix"] = int(header.get("NAXIS1", 0) or 0) * int(header.get("NAXIS2", 0) or 0)
    return rec


def read_exposure_table(path, check_headers: bool = True) -> pd.DataFrame:
    """Read, fill from FITS headers and validate an exposures table.

    Returns one row per raw frame with columns ``COLUMNS``: path, visit and
    detector (int, -1 where not needed), band ('' for bias/dark), type, mjd
    (days) and exptime (s) (NaN where unknown), template (bool), seq (0, 1, ...
    within each calibration group of type, detector and band, in table order:
    the ``{seq}`` of ``raw_bias`` etc.), npix (NAXIS1 x NAXIS2 of the raw
    image, 0 if headers were not read) and line (the table's line number).

    Raises ExposureTableError (one message naming the table, line and column) on
    a missing file, unknown column or frame type, a value missing from both
    table and header, a table/header disagreement, a duplicate dataId, a visit
    observed in two bands, or a detector with object frames but no bias, dark
    or flat (in its band) to calibrate them.
    """
    path = Path(path)
    # Parsed once per file version: the workflow asks at parse time from several rule files.
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size, bool(check_headers))
    except OSError:
        key = None
    if key in _TABLE_CACHE:
        return _TABLE_CACHE[key].copy()
    df = _read_exposure_table(path, check_headers)
    if key is not None:
        _TABLE_CACHE[key] = df.copy()
    return df


_TABLE_CACHE: dict = {}


def _read_exposure_table(path: Path, check_headers: bool) -> pd.DataFrame:
    schema = load_schema()
    header, body = _read_rows(path)
    records = []
    for line, cells in body:
        cells = dict(zip(header, cells + [""] * (len(header) - len(cells))))
        rec = resolve_row(cells, path, line, schema, check_headers=check_headers)
        rec["line"] = line
        records.append(rec)
    if not records:
        raise ExposureTableError("the exposures table lists no frames", path)
    df = pd.DataFrame.from_records(records)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    df["visit"] = df["visit"].fillna(-1).astype(int)
    df["detector"] = df["detector"].fillna(-1).astype(int)
    df["band"] = df["band"].fillna("").astype(str)
    df["mjd"] = df["mjd"].astype(float)
    df["exptime"] = df["exptime"].astype(float)
    df["template"] = df["template"].fillna(False).astype(bool)
    df["npix"] = df["npix"].fillna(0).astype(int)
    # Calibration frames of bias and dark have no band, whatever their FILTER card says.
    df.loc[df["type"].isin(["bias", "dark"]), "band"] = ""
    df.loc[df["type"] != "object", "visit"] = -1
    df["seq"] = df.groupby(["type", "detector", "band"]).cumcount()
    df.loc[df["type"] == "object", "seq"] = 0
    _check_table(df, path)
    return df[COLUMNS].reset_index(drop=True)


def _check_table(df: pd.DataFrame, table) -> None:
    """Checks across rows: duplicate files and dataIds, one band per visit, calibrations present."""
    dup = df[df.duplicated("path", keep=False)]
    if len(dup):
        lines = dup.loc[dup["path"] == dup["path"].iloc[0], "line"].tolist()
        raise ExposureTableError(f"{table} lines {lines}: the same file {dup['path'].iloc[0]} is listed twice")
    obj = df[df["type"] == "object"]
    if obj.empty:
        raise ExposureTableError(f"{table}: no object (science) frames; column 'type'")
    dup = obj[obj.duplicated(["visit", "detector"], keep=False)]
    if len(dup):
        v, d = int(dup["visit"].iloc[0]), int(dup["detector"].iloc[0])
        lines = dup.loc[(dup["visit"] == v) & (dup["detector"] == d), "line"].tolist()
        raise ExposureTableError(f"{table} lines {lines}: duplicate dataId visit={v}, detector={d} "
                                 "(columns 'visit', 'detector'; each detector of a visit is one file)")
    for v, grp in obj.groupby("visit"):
        if grp["band"].nunique() > 1:
            raise ExposureTableError(f"{table} lines {grp['line'].tolist()}: visit {v} is in several bands "
                                     f"{sorted(grp['band'].unique())} (column 'band')")
    check_calibrations(df, table)


def check_calibrations(df: pd.DataFrame, table, min_frames: int = 1) -> None:
    """Every detector with object frames has >= ``min_frames`` biases, darks and flats (per band).

    ``min_frames`` is calib.min_frames (the master combination refuses fewer);
    the workflow checks it at start instead of failing in a master_* job.
    """
    obj = science(df)
    for d, grp in obj.groupby("detector"):
        first = int(grp["line"].iloc[0])
        for kind in ("bias", "dark"):
            n = int(((df["type"] == kind) & (df["detector"] == d)).sum())
            if n < max(1, min_frames):
                raise ExposureTableError(f"{table} line {first}: detector {d} has object frames but {n} {kind} "
                                         f"frame(s) to calibrate them, {max(1, min_frames)} needed "
                                         "(column 'type'; calib.min_frames)")
        for b in sorted(grp["band"].unique()):
            n = int(((df["type"] == "flat") & (df["detector"] == d) & (df["band"] == b)).sum())
            if n < max(1, min_frames):
                raise ExposureTableError(f"{table} line {first}: detector {d} has band {b} object frames but "
                                         f"{n} {b} flat(s), {max(1, min_frames)} needed "
                                         "(columns 'type', 'band'; calib.min_frames)")


# ------------------------------------------------------------- lookups
def science(df: pd.DataFrame) -> pd.DataFrame:
    """The object (science and template) frames."""
    return df[df["type"] == "object"]


def data_ids(df: pd.DataFrame) -> list[tuple[int, int]]:
    """(visit, detector) of every object frame, sorted."""
    obj = science(df)
    return sorted(zip(obj["visit"].astype(int), obj["detector"].astype(int)))


def visits(df: pd.DataFrame) -> list[int]:
    return sorted(int(v) for v in science(df)["visit"].unique())


def detectors(df: pd.DataFrame) -> list[int]:
    return sorted(int(d) for d in science(df)["detector"].unique())


def bands(df: pd.DataFrame) -> list[str]:
    return sorted(str(b) for b in science(df)["band"].unique())


def visit_bands(df: pd.DataFrame) -> dict[int, str]:
    obj = science(df)
    return {int(v): str(b) for v, b in zip(obj["visit"], obj["band"])}


def visit_mjds(df: pd.DataFrame) -> dict[int, float]:
    """Mean MJD (days) of each visit's frames."""
    return {int(v): float(m) for v, m in science(df).groupby("visit")["mjd"].mean().items()}


def template_pool(df: pd.DataFrame) -> list[int]:
    """Visits flagged template=true; every visit if none is flagged."""
    obj = science(df)
    flagged = obj.loc[obj["template"], "visit"]
    return sorted(int(v) for v in (flagged if len(flagged) else obj["visit"]).unique())


def raw_path(df: pd.DataFrame, visit, detector) -> str:
    """Path of the raw object frame of one (visit, detector); KeyError naming the dataId if absent."""
    obj = science(df)
    hit = obj[(obj["visit"] == int(visit)) & (obj["detector"] == int(detector))]
    if hit.empty:
        raise KeyError(f"the exposures table has no object frame visit={visit}, detector={detector}")
    return str(hit["path"].iloc[0])


def calib_paths(df: pd.DataFrame, kind: str, detector, band=None) -> list[str]:
    """Paths of the raw calibration frames of a kind ('bias', 'dark', 'flat') for a detector (and band)."""
    sel = (df["type"] == kind) & (df["detector"] == int(detector))
    if kind == "flat":
        sel &= df["band"] == str(band)
    return df.loc[sel].sort_values("seq")["path"].astype(str).tolist()


def lookup(df: pd.DataFrame, dataset_type: str, **data_id) -> str:
    """The Butler's get() for raw dataset types: raw, raw_bias, raw_dark, raw_flat -> path."""
    if dataset_type == "raw":
        return raw_path(df, data_id["visit"], data_id["detector"])
    kind = dataset_type.removeprefix("raw_")
    if kind not in ("bias", "dark", "flat"):
        raise KeyError(f"dataset type {dataset_type!r} does not come from the exposures table")
    paths = calib_paths(df, kind, data_id["detector"], data_id.get("band"))
    seq = int(data_id["seq"])
    if not 0 <= seq < len(paths):
        raise KeyError(f"the exposures table has {len(paths)} {kind} frame(s) for {data_id}, no seq {seq}")
    return paths[seq]


# ------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("inputs", help="read, fill from FITS headers and validate an exposures table")
    p.add_argument("table", nargs="?", default="config/exposures.tsv", help="exposures table (TSV)")
    p.add_argument("-o", "--output", help="write the resolved table here (TSV) instead of printing it")
    p.add_argument("--no-headers", action="store_true", help="do not open the FITS files (table only)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    df = read_exposure_table(args.table, check_headers=not args.no_headers)
    out = df.drop(columns=["line"])
    text = out.to_csv(sep="\t", index=False, float_format="%.12g")
    if args.output:
        from .fileio import write_text

        write_text(text, args.output)
    else:
        print(text, end="")
    sys.stdout.flush()
    obj = science(df)
    counts = df["type"].value_counts().to_dict()
    print(f"# {len(df)} frames ({', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}); "
          f"{obj['visit'].nunique()} visits, detectors {detectors(df)}, bands {bands(df)}, "
          f"template pool {template_pool(df)}", file=sys.stderr)
    return 0
