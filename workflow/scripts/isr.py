"""Snakemake entry: ISR of one raw frame -> postisr Exposure."""

from diapipe import isr, logs
from diapipe.fileio import DiapipeError

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
try:
    data_id = {"visit": int(sm.wildcards.visit), "detector": int(sm.wildcards.detector)}
    if "band" in sm.params.keys():  # from the exposures table (inputs.source 'table')
        data_id["band"] = sm.params.band
    isr.isr_file(
        sm.input.raw,
        sm.output.postisr,
        bias_path=sm.input.bias,
        dark_path=sm.input.dark,
        flat_path=list(sm.input.flats),
        config=dict(sm.params.isr),
        data_id=data_id,
    )
except DiapipeError as exc:
    # One clear line in the job's log (file and dataId), not a traceback.
    log.error("DiapipeError: %s", exc)
    raise SystemExit(1)
