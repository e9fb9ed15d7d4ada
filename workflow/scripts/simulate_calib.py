"""Snakemake entry: all raw calibration frames (bias, dark, twilight flats) of one detector."""

from diapipe import logs, simulate
from diapipe.fileio import write_fits

sm = snakemake  # noqa: F821
log = logs.setup(sm.log[0])
cfg = {"seed": sm.params.seed, "simulate": dict(sm.params.sim)}
detector = int(sm.wildcards.detector)
frames = [c for c in simulate.calib_frames(cfg) if c["detector"] == detector]
paths = {"bias": list(sm.output.bias), "dark": list(sm.output.dark), "flat": list(sm.output.flat)}
bands = list(cfg["simulate"]["bands"])
nflat = len(paths["flat"]) // len(bands)
for c in frames:
    kind, seq = c["kind"], c["seq"]
    # Outputs are listed band-major, then seq (see the expand() in simulate.smk).
    i = bands.index(c["band"]) * nflat + seq if kind == "flat" else seq
    hdul = simulate.simulate_calib(cfg, kind, detector, seq, c["band"], seed=sm.params.seed)
    write_fits(hdul, paths[kind][i])
    log.info("wrote %s detector=%d seq=%d band=%s", kind, detector, seq, c["band"])
