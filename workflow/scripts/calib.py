"""Snakemake entry: one master calibration (bias, dark or flat) of one detector (and band)."""

from diapipe import calib, logs
from diapipe.fileio import DiapipeError

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    data_id = {"detector": int(sm.wildcards.detector)}
    if "band" in sm.wildcards.keys():
        data_id["band"] = sm.wildcards.band
    kind = sm.params.kind
    inputs = dict(sm.input.items())
    calib.make_master(
        kind,
        list(sm.input.frames),
        sm.output[0],
        bias=inputs.get("bias"),
        dark=inputs.get("dark"),
        config=dict(sm.params.calib),
        data_id=data_id,
    )
except DiapipeError as exc:
    # One clear line in the job's log (file and dataId), not a traceback.
    log.error("DiapipeError: %s", exc)
    raise SystemExit(1)
