"""Master calibrations: bias, dark and flat per detector (flats per band).

Each raw calibration frame is overscan-corrected, trimmed, assembled and
converted to electrons exactly as a science raw (``diapipe.isr.assemble``);
then the frames are combined per pixel with sigma clipping:

    master bias  (e-)      = clipped mean of the bias frames
    master dark  (e-/s)    = clipped mean of (dark - master bias) / DARKTIME
    master flat  (unit)    = clipped mean of (flat - bias - dark*DARKTIME) / median(frame),
                             normalised to median 1

VARIANCE is the variance of the combined value (sample variance of the kept
frames / number kept).  MASK has BAD set on defects found in the master itself:
bias pixels far from the local bias level, hot pixels in the dark, dead or
deviant pixels in the flat, and whole columns whose median deviates (bad
columns).  Each master is an Exposure file with OBSTYPE, NCOMBINE, NBADPIX in
its header.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import masks
from .exposure import Exposure, MaskedImage
from .fileio import DiapipeError
from .isr import assemble, read_raw

log = logging.getLogger("diapipe.calib")

#: Defaults of the ``calib`` config block (workflow/schemas/stages/calib.schema.yaml).
DEFAULTS = {
    "overscan_fit": "poly",
    "overscan_order": 3,
    "clip_sigma": 4.0,
    "min_frames": 2,
    "bias_bad_sigma": 8.0,
    "hot_sigma": 6.0,
    "hot_min_rate": 0.05,
    "flat_bad_sigma": 6.0,
    "flat_bad_frac": 0.2,
    "background_block": 64,
}

KINDS = ("bias", "dark", "flat")


# ---------------------------------------------------------------- combining
def clipped_mean(frames: list[np.ndarray], nsigma: float = 4.0, chunk_rows: int = 256):
    """Per-pixel sigma-clipped mean of equally shaped frames.

    Pixels further than ``nsigma`` x sigma from the per-pixel median are
    rejected, where sigma is the larger of the per-pixel robust scatter
    (1.4826 MAD) and the scatter pooled over the chunk (a few frames give a
    noisy MAD).  Returns (mean, variance of the mean, number kept), float32 /
    float32 / int16.  Works in row chunks to bound memory.
    """
    n = len(frames)
    shape = frames[0].shape
    mean = np.empty(shape, np.float32)
    var = np.empty(shape, np.float32)
    nkept = np.empty(shape, np.int16)
    for r0 in range(0, shape[0], chunk_rows):
        stack = np.stack([f[r0 : r0 + chunk_rows] for f in frames]).astype(np.float32)
        med = np.median(stack, axis=0)
        dev = np.abs(stack - med)
        mad = 1.4826 * np.median(dev, axis=0)
        pooled = np.float32(np.median(mad)) if n > 2 else np.float32(0)
        sigma = np.maximum(mad, pooled)
        if n > 2:
            keep = dev <= nsigma * sigma
        elif n == 2:
            # Two frames cannot out-vote each other: where they disagree by more than
            # the noise allows, keep the lower (cosmic rays only add charge).
            pooled = np.float32(np.median(np.abs(stack[0] - stack[1])) * 1.4826 / np.sqrt(2))
            differ = np.abs(stack[0] - stack[1]) > nsigma * np.sqrt(2) * pooled
            low = np.argmin(stack, axis=0)
            keep = np.ones(stack.shape, bool)
            keep[0] &= ~(differ & (low == 1))
            keep[1] &= ~(differ & (low == 0))
        else:
            keep = np.ones(stack.shape, bool)
        k = keep.sum(0)
        s = np.where(keep, stack, 0).sum(0)
        m = s / np.maximum(k, 1)
        ss = np.where(keep, (stack - m) ** 2, 0).sum(0)
        sv = ss / np.maximum(k - 1, 1)
        # Too few survivors for a sample variance: fall back on the pooled scatter.
        sv = np.where(k > 1, sv, pooled**2)
        mean[r0 : r0 + chunk_rows] = m
        var[r0 : r0 + chunk_rows] = sv / np.maximum(k, 1)
        nkept[r0 : r0 + chunk_rows] = k
    return mean, var, nkept


def smooth_variance(var: np.ndarray, size: int = 7) -> np.ndarray:
    """Per-pixel sample variances of a few frames are noisy (chi^2 with n-1 dof); their
    local mean is as unbiased and far less noisy.  Pixels whose own variance is more
    than 4x the local mean (hot pixels, Poisson-noisy defects) keep their own."""
    smooth = ndimage.uniform_filter(var.astype(np.float32), size=size, mode="nearest")
    return np.where(var > 4 * smooth, var, smooth).astype(np.float32)


def smooth_background(image: np.ndarray, block: int = 64) -> np.ndarray:
    """Large-scale level of ``image``: block medians, bilinearly interpolated to full size."""
    ny, nx = image.shape
    # At least ~8 blocks a side, so small detectors still follow vignetting.
    block = max(8, min(block, ny // 8, nx // 8))
    by, bx = max(1, ny // block), max(1, nx // block)
    hy, hx = ny // by, nx // bx
    core = image[: by * hy, : bx * hx].reshape(by, hy, bx, hx).transpose(0, 2, 1, 3).reshape(by, bx, -1)
    med = np.nanmedian(core, axis=-1)
    # Ghost blocks linearly extrapolated beyond the edges, so gradients (vignetting)
    # continue to the detector edge instead of flattening out.
    med = np.pad(med, 1, mode="reflect", reflect_type="odd")
    yc = (np.arange(-1, by + 1) + 0.5) * hy - 0.5
    xc = (np.arange(-1, bx + 1) + 0.5) * hx - 0.5
    yi = np.interp(np.arange(ny), yc, np.arange(by + 2))
    xi = np.interp(np.arange(nx), xc, np.arange(bx + 2))
    yy, xx = np.meshgrid(yi, xi, indexing="ij")
    return ndimage.map_coordinates(med, [yy, xx], order=1, mode="nearest").astype(np.float32)


def _robust_std(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    if x.size > 2_000_000:
        x = x[:: x.size // 1_000_000]
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def defect_map(dev: np.ndarray, threshold: float, sign: int = 0, window: int = 31) -> np.ndarray:
    """Defective pixels of a master from its deviation ``dev`` from the local level.

    A pixel is flagged when its deviation exceeds ``threshold`` (``sign`` +1:
    only high, e.g. hot; -1: only low; 0: both).  Bad columns (hot or low
    segments running along a column, possibly from a trap part-way up) are
    found by a running mean of the (clipped) deviation along each column over
    ``window`` rows: where it exceeds half the threshold the pixels are flagged
    even if single pixels are within the noise.  Gaps of up to 3 pixels between
    flagged pixels of a column are filled.
    """
    d = dev if sign == 0 else sign * dev
    # Clip so that one very hot pixel does not make its column segment look bad.
    capped = np.clip(d, -2 * threshold, 2 * threshold)
    run = ndimage.uniform_filter1d(capped, size=window, axis=0, mode="nearest")
    if sign == 0:
        flagged = (np.abs(d) > threshold) | (np.abs(run) > 0.5 * threshold)
    else:
        flagged = (d > threshold) | (run > 0.5 * threshold)
    return flagged | ndimage.binary_closing(flagged, structure=np.ones((5, 1), bool))


# ---------------------------------------------------------------- frames
def _load_frames(paths, kind: str, cfg: dict, data_id: dict):
    """Read, validate and assemble raw calibration frames: list of (RawFrame, e- image)."""
    if len(paths) < int(cfg["min_frames"]):
        raise DiapipeError(f"master {kind} needs at least {cfg['min_frames']} frames, got {len(paths)}",
                           None, data_id)
    required = {"bias": (), "dark": ("EXPTIME",), "flat": ("EXPTIME", "FILTER")}[kind]
    out = []
    shape = None
    amp_map = None
    for p in paths:
        raw = read_raw(p, data_id, required=required)
        typ = str(raw.header.get("OBSTYPE", raw.header.get("IMAGETYP", kind))).strip().lower()
        if kind not in typ and not (kind == "bias" and "zero" in typ):
            raise raw.error(f"frame is of type {typ!r}, not a {kind}")
        asm = assemble(raw, cfg["overscan_fit"], cfg["overscan_order"])
        if shape is None:
            shape, amp_map = asm.image.shape, asm.amp_map
        elif asm.image.shape != shape:
            raise raw.error(f"frame assembles to shape {asm.image.shape}, the others to {shape}")
        out.append((raw, asm))
    return out, amp_map


def _check_shape(master: Exposure | None, shape, what: str, data_id) -> None:
    if master is not None and master.shape != tuple(shape):
        raise DiapipeError(f"master {what} has shape {master.shape}, frames {tuple(shape)}", None, data_id)


def _meta(kind, raws, data_id, unit, nbad) -> dict:
    h = raws[0].header
    meta = {k: v for k, v in data_id.items()}
    meta.update({"OBSTYPE": kind, "NCOMBINE": len(raws), "BUNIT": unit, "NBADPIX": int(nbad)})
    for k in ("DETECTOR", "CCDNAME", "TELESCOP", "INSTRUME"):
        if k in h:
            meta[k] = h[k]
    if "detector" not in meta and "DETECTOR" in h:
        meta["detector"] = h["DETECTOR"]
    mjds = [r.header["MJD-OBS"] for r in raws if "MJD-OBS" in r.header]
    if mjds:
        meta["MJD-OBS"] = float(np.mean(mjds))
    return meta


def make_master_bias(paths, config: dict | None = None, data_id: dict | None = None) -> Exposure:
    """Master bias (e-) from raw bias frames; BAD where the bias is far from its local level."""
    cfg = {**DEFAULTS, **(config or {})}
    data_id = dict(data_id or {})
    frames, amp_map = _load_frames(paths, "bias", cfg, data_id)
    mean, var, _ = clipped_mean([a.image for _, a in frames], cfg["clip_sigma"])
    var = smooth_variance(var)
    # The bias has legitimate column patterns and a ramp at the start of the readout
    # (the master bias removes them): compare each pixel with its column neighbours only.
    dev = mean - ndimage.median_filter(mean, size=(9, 1), mode="nearest")
    thresh = cfg["bias_bad_sigma"] * np.sqrt(max(float(np.median(var)), 1e-12))
    bad = np.abs(dev) > thresh
    return _finish("bias", frames, data_id, mean, var, bad, "electron")


def make_master_dark(paths, bias: Exposure | None = None, config: dict | None = None,
                     data_id: dict | None = None) -> Exposure:
    """Master dark current (e-/s) from raw darks; BAD on hot pixels and hot columns."""
    cfg = {**DEFAULTS, **(config or {})}
    data_id = dict(data_id or {})
    frames, amp_map = _load_frames(paths, "dark", cfg, data_id)
    _check_shape(bias, frames[0][1].image.shape, "bias", data_id)
    rates = []
    for raw, asm in frames:
        t = float(raw.header.get("DARKTIME", raw.header["EXPTIME"]))
        if not t > 0:
            raise raw.error(f"dark has DARKTIME/EXPTIME {t}: cannot make a rate")
        img = asm.image if bias is None else asm.image - bias.image
        rates.append(img / np.float32(t))
    mean, var, _ = clipped_mean(rates, cfg["clip_sigma"])
    del rates
    var = smooth_variance(var)
    if bias is not None:
        # The same master bias was subtracted from every dark: its noise is common to all
        # frames, invisible in their scatter, and adds to the master dark's variance.
        t_mean = float(np.mean([float(r.header.get("DARKTIME", r.header["EXPTIME"])) for r, _ in frames]))
        var += bias.variance / np.float32(t_mean**2)
    level = smooth_background(mean, cfg["background_block"])
    dev = mean - level
    thresh = max(cfg["hot_sigma"] * _robust_std(dev), cfg["hot_min_rate"])
    bad = defect_map(dev, thresh, sign=+1)
    if bias is not None:
        bad |= masks.is_set(bias.mask, "BAD")
    return _finish("dark", frames, data_id, mean, var, bad, "electron/s")


def make_master_flat(paths, bias: Exposure | None = None, dark: Exposure | None = None,
                     config: dict | None = None, data_id: dict | None = None) -> Exposure:
    """Master flat (median 1) from raw twilight/dome flats of one band; BAD on dead and
    deviant pixels and bad columns."""
    cfg = {**DEFAULTS, **(config or {})}
    data_id = dict(data_id or {})
    frames, amp_map = _load_frames(paths, "flat", cfg, data_id)
    shape = frames[0][1].image.shape
    _check_shape(bias, shape, "bias", data_id)
    _check_shape(dark, shape, "dark", data_id)
    # A band from the workflow (e.g. the exposures table) stands in for a missing FILTER card.
    bands = {str(r.header.get("FILTER", data_id.get("band", ""))).strip() for r, _ in frames}
    if len(bands) > 1:
        raise DiapipeError(f"flats of several bands combined: {sorted(bands)}", None, data_id)
    band = bands.pop()
    if "band" in data_id and str(data_id["band"]) != band:
        raise DiapipeError(f"flat frames are band {band!r}, expected {data_id['band']!r}", None, data_id)
    data_id.setdefault("band", band)
    normed, common = [], []
    for raw, asm in frames:
        img = asm.image
        if bias is not None:
            img = img - bias.image
        if dark is not None:
            img = img - dark.image * np.float32(float(raw.header.get("DARKTIME", raw.header["EXPTIME"])))
        level = float(np.median(img[::4, ::4]))
        if not level > 0:
            raise raw.error(f"flat has median level {level:.3g} e-: not illuminated")
        normed.append(img / np.float32(level))
        t = float(raw.header.get("DARKTIME", raw.header["EXPTIME"]))
        common.append((level, t))
    mean, var, _ = clipped_mean(normed, cfg["clip_sigma"])
    del normed
    var = smooth_variance(var)
    # Noise of the master bias and dark, common to every flat (see make_master_dark).
    for m, scale in ((bias, lambda lv, t: 1.0 / lv), (dark, lambda lv, t: t / lv)):
        if m is not None:
            k2 = float(np.mean([scale(lv, t) ** 2 for lv, t in common]))
            var += m.variance * np.float32(k2)
    ratio = mean / smooth_background(mean, cfg["background_block"])
    dev = np.where(np.isfinite(ratio), ratio - 1, -1.0)
    thresh = max(cfg["flat_bad_sigma"] * _robust_std(dev), cfg["flat_bad_frac"])
    bad = defect_map(dev, thresh, sign=0)
    # Unit median over the good pixels (the convention of the simulator's truth).
    norm = float(np.median(mean[~bad]))
    mean /= norm
    var /= norm**2
    for m in (bias, dark):
        if m is not None:
            bad |= masks.is_set(m.mask, "BAD")
    return _finish("flat", frames, data_id, mean, var, bad, "")


def _finish(kind, frames, data_id, mean, var, bad, unit) -> Exposure:
    raws = [r for r, _ in frames]
    mask = np.zeros(mean.shape, masks.MASK_DTYPE)
    masks.set_plane(mask, bad, "BAD")
    meta = _meta(kind, raws, data_id, unit, bad.sum())
    log.info("master %s %s from %d frames: %d BAD pixels (%.3f%%)", kind, data_id, len(raws),
             bad.sum(), 100 * bad.mean())
    return Exposure(MaskedImage(mean, mask, var), metadata=meta)


# ---------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("calib", help="combine raw calibration frames into a master bias/dark/flat")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("frames", nargs="+", help="raw calibration frames")
    p.add_argument("-o", "--output", required=True, help="output master Exposure FITS")
    p.add_argument("--bias", help="master bias (for dark and flat)")
    p.add_argument("--dark", help="master dark (for flat)")
    p.add_argument("--detector", type=int, help="detector number (for messages and the header)")
    p.add_argument("--band", help="band (flat)")
    p.add_argument("--config", help="YAML file with a calib block (or the full pipeline config)")
    p.set_defaults(func=_cli)


def make_master(kind, frames, output, bias=None, dark=None, config=None, data_id=None) -> Exposure:
    """File-level entry point used by the CLI and the Snakemake script."""
    b = Exposure.read(bias) if bias else None
    d = Exposure.read(dark) if dark else None
    if kind == "bias":
        m = make_master_bias(frames, config, data_id)
    elif kind == "dark":
        m = make_master_dark(frames, b, config, data_id)
    elif kind == "flat":
        m = make_master_flat(frames, b, d, config, data_id)
    else:
        raise ValueError(f"unknown calibration kind {kind!r}")
    m.metadata["FILENAME"] = Path(output).name
    m.write(output)
    return m


def _cli(args) -> int:
    from . import logs

    logs.setup()
    cfg = {}
    if args.config:
        import yaml

        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        cfg = loaded.get("calib", loaded)
    data_id = {}
    if args.detector is not None:
        data_id["detector"] = args.detector
    if args.band:
        data_id["band"] = args.band
    make_master(args.kind, args.frames, args.output, args.bias, args.dark, cfg, data_id)
    return 0
