"""Instrument signature removal: raw multi-amplifier frame -> ``postisr`` Exposure.

Steps, per amplifier then on the assembled detector (as LSST ip_isr / ccdproc):

1. read the raw and parse its header sections (DATASEC<L>, BIASSEC<L>, DETSEC<L>
   or, for single-amplifier cameras, TRIMSEC/DATASEC and BIASSEC);
2. saturation: raw ADU >= SATURAT<L> (or the ADC maximum) -> SAT, grown along
   the columns to cover the ends of bleed trails;
3. overscan: a robust mean of the overscan columns per row, fitted along the
   rows with a low-order Legendre polynomial (the bias drifts slowly with row),
   subtracted from that amplifier's data rows;
4. gain: ADU -> electrons with GAIN<L>; amplifiers placed into the detector by DETSEC;
5. master bias (e-), master dark (e-/s) x DARKTIME, master flat (unit mean);
6. variance (e-^2) = (Poisson signal + read noise^2 + dark/bias noise) / flat^2
   + flat noise; BAD from the masters' masks;
7. cosmic rays (L.A.Cosmic, van Dokkum 2001) into CR, optionally interpolated (INTRP).

The image stays in electrons in the flat-fielded frame, sky NOT subtracted.
Everything is vectorised numpy/scipy.ndimage; the expensive median filters of
L.A.Cosmic are evaluated only at candidate pixels (see ``find_cosmic_rays``).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning
from numpy.lib.stride_tricks import sliding_window_view
from numpy.polynomial import legendre
from scipy import ndimage

from . import masks
from .exposure import Exposure, MaskedImage
from .fileio import DiapipeError

log = logging.getLogger("diapipe.isr")

#: Defaults of the ``isr`` config block (workflow/schemas/stages/isr.schema.yaml).
DEFAULTS = {
    "overscan_fit": "poly",
    "overscan_order": 3,
    "overscan_clip": 3.0,
    "saturation_margin": 3.0,
    "saturation_grow_y": 2,
    "saturation_grow_x": 1,
    "flat_min": 0.2,
    "cr_detect": True,
    "cr_sigclip": 4.5,
    "cr_sigfrac": 0.3,
    "cr_objlim": 3.0,
    "cr_niter": 4,
    "cr_grow": 1,
    "cr_interpolate": True,
}

#: Headers a science raw must have (anything else has a fallback).
REQUIRED_KEYS = ("EXPTIME", "FILTER")

ADC_MAX = 65535.0

# Header keys carried from the raw into the postisr metadata, when present.
CARRY_KEYS = (
    "OBSTYPE", "IMAGETYP", "DATE-OBS", "MJD-OBS", "EXPTIME", "DARKTIME", "FILTER",
    "AIRMASS", "DETECTOR", "CCDNAME", "EXPNUM", "RA", "DEC", "TELESCOP", "INSTRUME",
    "OBJECT", "OBSERVAT",
)

_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


# ---------------------------------------------------------------- sections
@dataclass(frozen=True)
class Section:
    """An IRAF section '[x1:x2,y1:y2]' (1-based, inclusive), as 0-based numpy slices.

    A section written high-to-low (x1 > x2) means the amplifier reads out
    flipped along that axis; ``flip_x``/``flip_y`` record it.
    """

    x0: int
    x1: int  # exclusive
    y0: int
    y1: int  # exclusive
    flip_x: bool = False
    flip_y: bool = False

    @classmethod
    def parse(cls, text: str) -> "Section":
        m = _SECTION_RE.match(str(text))
        if not m:
            raise ValueError(f"not an IRAF section: {text!r}")
        x1, x2, y1, y2 = (int(g) for g in m.groups())
        if min(x1, x2, y1, y2) < 1:
            raise ValueError(f"IRAF sections are 1-based: {text!r}")
        return cls(min(x1, x2) - 1, max(x1, x2), min(y1, y2) - 1, max(y1, y2), x1 > x2, y1 > y2)

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def inside(self, shape) -> bool:
        return self.y1 <= shape[0] and self.x1 <= shape[1]

    def __str__(self) -> str:
        return f"[{self.x0 + 1}:{self.x1},{self.y0 + 1}:{self.y1}]"


@dataclass
class Amplifier:
    """One amplifier's geometry (raw pixel sections) and electronics."""

    name: str
    data: Section  # science pixels in the raw array
    bias: Section | None  # serial overscan columns in the raw array
    det: Section  # where the data go in the assembled, trimmed detector
    gain: float  # e-/ADU
    read_noise: float  # e-
    saturation: float  # ADU in the raw (before overscan)


@dataclass
class RawFrame:
    """A raw frame: ADU pixels (float32), header and its amplifiers."""

    path: str
    header: fits.Header
    data: np.ndarray
    amps: list[Amplifier]
    data_id: dict = field(default_factory=dict)

    @property
    def detector_shape(self) -> tuple[int, int]:
        return (max(a.det.y1 for a in self.amps), max(a.det.x1 for a in self.amps))

    def error(self, message: str) -> DiapipeError:
        return DiapipeError(message, self.path, self.data_id)


# ---------------------------------------------------------------- reading
def data_id_from_header(header) -> dict:
    """dataId (visit, detector, band) from EXPNUM, DETECTOR, FILTER where present."""
    out = {}
    for key, card in (("visit", "EXPNUM"), ("detector", "DETECTOR"), ("band", "FILTER")):
        if card in header and header[card] not in (None, ""):
            value = header[card]
            out[key] = value.strip() if isinstance(value, str) else value
    return out


def read_raw(path, data_id: dict | None = None, required=REQUIRED_KEYS) -> RawFrame:
    """Read and validate a raw frame; any problem is one DiapipeError naming file and dataId.

    ``required`` lists header keys that must be present (EXPTIME and FILTER for
    science frames; pass ``()`` for a bias).  ``data_id`` (e.g. from the
    workflow) is used in messages and overrides what the header says.
    """
    path = str(path)
    given = dict(data_id or {})
    try:
        with warnings.catch_warnings():
            # A truncated file is only a warning to astropy; to us it is an error.
            warnings.simplefilter("error", AstropyUserWarning)
            with fits.open(path, memmap=False) as hdul:
                hdu = next((h for h in hdul if h.data is not None and h.data.ndim == 2), None)
                if hdu is None:
                    raise DiapipeError("raw has no 2-D image HDU", path, given)
                header = hdul[0].header.copy()
                if hdu is not hdul[0]:
                    header.update(hdu.header)
                data = np.asarray(hdu.data, dtype=np.float32)
    except DiapipeError:
        raise
    except (OSError, ValueError, TypeError, IndexError, AstropyUserWarning) as exc:
        raise DiapipeError(f"cannot read raw FITS, truncated or corrupt? ({exc})", path, given) from exc
    from_header = data_id_from_header(header)
    ids = {**from_header, **given}
    clash = [k for k in ("visit", "detector") if k in given and k in from_header
             and str(given[k]) != str(from_header[k])]
    if clash:
        raise DiapipeError("raw header disagrees with the dataId: " + ", ".join(
            f"header {k}={from_header[k]}" for k in clash) + " (wrong file in this place?)", path, given)
    # A band given by the caller stands in for a FILTER card (real cameras spell it differently).
    missing = [k for k in required if (k not in header or header[k] in (None, ""))
               and not (k == "FILTER" and "band" in given)]
    if missing:
        raise DiapipeError(f"raw header lacks required key(s) {', '.join(missing)}", path, ids)
    for key in ("EXPTIME", "DARKTIME"):
        if key in header and header[key] not in (None, ""):
            try:
                ok = np.isfinite(float(header[key])) and float(header[key]) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise DiapipeError(f"raw header {key}={header[key]!r} is not a time in seconds", path, ids)
    try:
        amps = amplifiers_from_header(header, data.shape)
    except ValueError as exc:
        raise DiapipeError(f"bad raw geometry: {exc}", path, ids) from exc
    return RawFrame(path, header, data, amps, ids)


def _number(header, key, fallback_key=None, default=None) -> float | None:
    for k in (key, fallback_key):
        if k and k in header and header[k] not in (None, ""):
            try:
                return float(header[k])
            except (TypeError, ValueError):
                raise ValueError(f"header {k}={header[k]!r} is not a number") from None
    return default


def amplifiers_from_header(header, shape) -> list[Amplifier]:
    """The amplifiers described by the header, checked against the array ``shape``.

    Multi-amplifier frames (NAMPS, DATASEC<L>, BIASSEC<L>, DETSEC<L>, GAIN<L>,
    RDNOISE<L>, SATURAT<L>, L = A, B, ...) and single-amplifier frames
    (TRIMSEC or DATASEC, BIASSEC, GAIN, RDNOISE, SATURATE) are both understood.
    Raises ValueError describing the first inconsistency.
    """
    names = []
    if "NAMPS" in header or "DATASECA" in header:
        n = int(header.get("NAMPS", 0)) or sum(1 for c in "ABCDEFGHIJKLMNOP" if f"DATASEC{c}" in header)
        names = [chr(ord("A") + i) for i in range(n)]
    amps = []
    if names:
        for name in names:
            if f"DATASEC{name}" not in header:
                raise ValueError(f"NAMPS={len(names)} but DATASEC{name} missing")
            data = Section.parse(header[f"DATASEC{name}"])
            bias = Section.parse(header[f"BIASSEC{name}"]) if f"BIASSEC{name}" in header else None
            det = Section.parse(header[f"DETSEC{name}"]) if f"DETSEC{name}" in header else None
            if det is None:
                if len(names) > 1:
                    raise ValueError(f"DETSEC{name} missing for a multi-amplifier frame")
                det = Section(0, data.shape[1], 0, data.shape[0])
            amps.append(_amp(header, name, data, bias, det, suffix=name))
    else:
        sec = header.get("TRIMSEC") or header.get("DATASEC")
        data = Section.parse(sec) if sec else Section(0, shape[1], 0, shape[0])
        bias = Section.parse(header["BIASSEC"]) if "BIASSEC" in header else None
        det = Section(0, data.shape[1], 0, data.shape[0])
        amps.append(_amp(header, "A", data, bias, det, suffix=None))
    for a in amps:
        for what, sec in (("DATASEC", a.data), ("BIASSEC", a.bias)):
            if sec is not None and not sec.inside(shape):
                raise ValueError(
                    f"amp {a.name} {what} {sec} lies outside the raw array of shape {shape} (ny, nx)"
                )
        if a.det.shape != a.data.shape:
            raise ValueError(f"amp {a.name} DETSEC {a.det} and DATASEC {a.data} differ in size")
    det_shape = (max(a.det.y1 for a in amps), max(a.det.x1 for a in amps))
    covered = sum(a.det.shape[0] * a.det.shape[1] for a in amps)
    if covered != det_shape[0] * det_shape[1]:
        raise ValueError(f"DETSECs do not tile a {det_shape} detector")
    return amps


def _amp(header, name, data, bias, det, suffix) -> Amplifier:
    s = suffix or ""
    gain = _number(header, f"GAIN{s}", "GAIN", 1.0)
    rn = _number(header, f"RDNOISE{s}", "RDNOISE", 0.0)
    sat = _number(header, f"SATURAT{s}" if s else "SATURATE", "SATURATE", ADC_MAX)
    if not gain > 0:
        raise ValueError(f"GAIN{s}={gain} must be positive")
    return Amplifier(name, data, bias, det, gain, rn, min(sat, ADC_MAX))


# ---------------------------------------------------------------- overscan
def overscan_level(raw: RawFrame, amp: Amplifier, fit: str = "poly", order: int = 3,
                   clip: float = 3.0) -> np.ndarray:
    """Fitted overscan level (ADU) for each row of ``amp``'s data section.

    Per row: the mean of the overscan columns after rejecting pixels more than
    ``clip`` robust sigmas from the row median (cosmic rays, bleed into the
    overscan).  Then, for ``fit='poly'``, a Legendre polynomial of ``order``
    fitted along the rows with iterative ``clip``-sigma rejection of rows;
    ``'constant'`` is the clipped mean of all rows; ``'none'`` returns zeros.
    """
    nrow = amp.data.shape[0]
    if fit == "none" or amp.bias is None:
        if fit != "none":
            log.warning("amp %s has no BIASSEC: no overscan subtracted (%s)", amp.name, raw.path)
        return np.zeros(nrow)
    strip = raw.data[amp.bias.slices].astype(np.float64)
    med = np.median(strip, axis=1, keepdims=True)
    dev = strip - med
    sigma = 1.4826 * np.median(np.abs(dev)) or np.std(dev) or 1.0
    keep = np.abs(dev) <= clip * sigma
    row_mean = (strip * keep).sum(1) / np.maximum(keep.sum(1), 1)
    row_err = sigma / np.sqrt(np.maximum(keep.sum(1), 1))
    rows = np.arange(amp.bias.y0, amp.bias.y1, dtype=float)
    good = np.ones(rows.size, bool)
    if fit == "constant":
        order = 0
    elif fit != "poly":
        raise ValueError(f"unknown overscan fit {fit!r}")
    # Map the detector rows onto [-1, 1] for a well-conditioned Legendre fit.
    lo, hi = min(rows[0], amp.data.y0), max(rows[-1], amp.data.y1 - 1)
    scale = lambda r: 2 * (r - lo) / max(hi - lo, 1) - 1  # noqa: E731
    coef = None
    for _ in range(5):
        coef = legendre.legfit(scale(rows[good]), row_mean[good], order)
        resid = row_mean - legendre.legval(scale(rows), coef)
        new = np.abs(resid) <= clip * max(np.std(resid[good]), np.median(row_err))
        if new.sum() < order + 2 or np.array_equal(new, good):
            break
        good = new
    data_rows = np.arange(amp.data.y0, amp.data.y1, dtype=float)
    return legendre.legval(scale(data_rows), coef)


def overscan_residual(raw: RawFrame, amp: Amplifier, level_rows: np.ndarray) -> float:
    """Mean of (overscan - fitted level) over the overscan rows that share data rows (ADU)."""
    if amp.bias is None:
        return float("nan")
    y0, y1 = max(amp.bias.y0, amp.data.y0), min(amp.bias.y1, amp.data.y1)
    strip = raw.data[y0:y1, amp.bias.x0:amp.bias.x1]
    return float(np.mean(strip - level_rows[y0 - amp.data.y0 : y1 - amp.data.y0, None]))


# ---------------------------------------------------------------- assembly
@dataclass
class Assembled:
    """Overscan-corrected, trimmed, gain-corrected detector image and per-pixel electronics."""

    image: np.ndarray  # e-, float32, (ny, nx)
    read_var: np.ndarray  # read noise^2, e-^2, float32
    sat: np.ndarray  # bool: raw ADU at or above the amp's saturation
    amp_map: np.ndarray  # int8 amplifier index of each pixel
    overscan_residual: dict  # amp name -> mean residual (ADU)
    overscan_mean: dict = field(default_factory=dict)  # amp name -> mean fitted level (ADU)


def assemble(raw: RawFrame, fit="poly", order=3, clip=3.0, sat_margin=3.0) -> Assembled:
    """Overscan-subtract each amplifier, trim, convert to electrons and place by DETSEC.

    A pixel is saturated when its raw ADU is within ``sat_margin`` read-noise sigmas
    of the amp's SATURAT<L> (read noise rides on the full-well plateau, and
    the bias drifts with row), or at the ADC maximum.
    """
    shape = raw.detector_shape
    image = np.empty(shape, np.float32)
    read_var = np.empty(shape, np.float32)
    sat = np.zeros(shape, bool)
    amp_map = np.empty(shape, np.int8)
    resid, mean_level = {}, {}
    for i, amp in enumerate(raw.amps):
        level = overscan_level(raw, amp, fit, order, clip)
        resid[amp.name] = overscan_residual(raw, amp, level)
        mean_level[amp.name] = float(np.mean(level))
        block = raw.data[amp.data.slices]
        s = block >= min(amp.saturation - sat_margin * amp.read_noise / amp.gain, ADC_MAX)
        e = (block - level[:, None].astype(np.float32)) * np.float32(amp.gain)
        if amp.det.flip_y:
            e, s = e[::-1], s[::-1]
        if amp.det.flip_x:
            e, s = e[:, ::-1], s[:, ::-1]
        ds = amp.det.slices
        image[ds] = e
        sat[ds] = s
        read_var[ds] = amp.read_noise**2
        amp_map[ds] = i
    return Assembled(image, read_var, sat, amp_map, resid, mean_level)


# ---------------------------------------------------------------- ISR
def _check_master(master: Exposure | None, what: str, raw: RawFrame, shape) -> None:
    if master is None:
        return
    md, rd = master.metadata.get("detector"), raw.data_id.get("detector")
    if md is not None and rd is not None and str(md) != str(rd):
        raise raw.error(f"master {what} is for detector {md}, the raw is detector {rd}")
    if master.shape != tuple(shape):
        raise raw.error(
            f"raw assembles to shape {tuple(shape)} (ny, nx) but the master {what} has shape "
            f"{master.shape}: wrong detector or wrong raw shape"
        )


def run_isr(raw: RawFrame, bias: Exposure | None = None, dark: Exposure | None = None,
            flat: Exposure | None = None, config: dict | None = None) -> Exposure:
    """ISR of one raw frame; returns the ``postisr`` Exposure (electrons, sky not subtracted).

    ``bias`` (e-), ``dark`` (e-/s) and ``flat`` (unit mean) are master
    calibrations from ``diapipe.calib``; any may be None (that step is skipped).
    ``config`` is the ``isr`` config block (missing keys take DEFAULTS).
    """
    cfg = {**DEFAULTS, **(config or {})}
    shape = raw.detector_shape
    for master, what in ((bias, "bias"), (dark, "dark"), (flat, "flat")):
        _check_master(master, what, raw, shape)
    if flat is not None and "band" in raw.data_id and "band" in flat.metadata:
        if str(flat.metadata["band"]) != str(raw.data_id["band"]):
            raise raw.error(f"flat is for band {flat.metadata['band']!r}, raw is {raw.data_id['band']!r}")
    asm = assemble(raw, cfg["overscan_fit"], cfg["overscan_order"], cfg["overscan_clip"],
                   cfg["saturation_margin"])
    image, noise_var = asm.image, asm.read_var  # noise_var: e-^2 besides the signal's Poisson
    mask = np.zeros(shape, masks.MASK_DTYPE)

    if bias is not None:
        image -= bias.image
        noise_var += bias.variance
        mask |= bias.mask & masks.bit("BAD")
    darktime = float(raw.header.get("DARKTIME", raw.header.get("EXPTIME", 0.0)) or 0.0)
    # Poisson part of the variance: dark electrons and sky+source electrons, before the flat.
    signal = _signal_for_variance(image, noise_var)
    if dark is not None:
        image -= dark.image * np.float32(darktime)
        noise_var += dark.variance * np.float32(darktime**2)
        mask |= dark.mask & masks.bit("BAD")
    if flat is not None:
        f = flat.image
        low = ~(f > cfg["flat_min"])  # also catches NaN
        masks.set_plane(mask, low, "BAD")
        f = np.where(low, np.float32(1.0), f)
        image /= f
        inv_f2 = 1.0 / (f * f)
        variance = (signal + noise_var) * inv_f2 + image * image * (flat.variance * inv_f2)
        mask |= flat.mask & masks.bit("BAD")
        poisson_scale = 1.0 / f  # d(var)/d(calibrated signal)
        noise_floor = noise_var * inv_f2
    else:
        variance = signal + noise_var
        poisson_scale = np.float32(1.0)
        noise_floor = noise_var
    variance = variance.astype(np.float32)

    sat = asm.sat
    if sat.any():
        gy, gx = int(cfg["saturation_grow_y"]), int(cfg["saturation_grow_x"])
        if gy or gx:
            sat = ndimage.binary_dilation(sat, structure=np.ones((2 * gy + 1, 2 * gx + 1), bool))
        masks.set_plane(mask, sat, "SAT")

    if cfg["cr_detect"]:
        cr, cleaned = find_cosmic_rays(
            image, noise_floor, poisson_scale, exclude=masks.is_set(mask, "BAD", "SAT"),
            sigclip=cfg["cr_sigclip"], sigfrac=cfg["cr_sigfrac"], objlim=cfg["cr_objlim"],
            niter=cfg["cr_niter"],
        )
        if cfg["cr_interpolate"] and cr.any():
            masks.set_plane(mask, cr, "INTRP")
            image[cr] = cleaned[cr]
            # The variance there followed the cosmic ray's charge; give it the interpolated value's.
            ps = poisson_scale[cr] if np.ndim(poisson_scale) else poisson_scale
            nf = noise_floor[cr] if np.ndim(noise_floor) else noise_floor
            variance[cr] = nf + ps * np.maximum(cleaned[cr], 0)
        g = int(cfg["cr_grow"])
        if g and cr.any():
            cr = _dilate_sparse(cr, g)
        masks.set_plane(mask, cr, "CR")

    meta = _metadata(raw, asm, darktime)
    meta["NCRPIX"] = int(masks.is_set(mask, "CR").sum())
    meta["NSATPIX"] = int(masks.is_set(mask, "SAT").sum())
    wcs = raw_wcs(raw.header)
    return Exposure(MaskedImage(image, mask, variance), wcs=wcs, metadata=meta)


def _signal_for_variance(image: np.ndarray, read_var: np.ndarray) -> np.ndarray:
    """Expected electrons of each pixel, for its Poisson variance (e-, >= 0).

    On the sky, the pixel's own value is a noisy estimate of its expectation:
    using it makes low pixels look less noisy than high ones and biases
    (image - truth)/sigma low by about 1/(2 sqrt(sky)).  There the 3x3 mean
    (a ninth of the noise) is used.  On sources (3x3 mean more than one
    pixel-sigma above the local background) the 3x3 mean would misjudge a
    peaked profile, and the bias of the own value is negligible: own value.
    """
    p = np.pad(image, 1, mode="edge")
    bkg = _coarse_background(image, low=False)
    ny, nx = image.shape
    out = np.empty(image.shape, np.float32)
    step = 32  # row blocks: the temporaries stay in cache
    for y0 in range(0, ny, step):
        y1 = min(ny, y0 + step)
        rows = p[y0:y1] + p[y0 + 1 : y1 + 1]
        rows += p[y0 + 2 : y1 + 2]
        smooth = rows[:, :-2] + rows[:, 1:-1]
        smooth += rows[:, 2:]
        smooth *= np.float32(1.0 / 9.0)
        b = bkg[y0:y1]
        rv = read_var[y0:y1] if np.ndim(read_var) else read_var
        source = smooth - b > np.sqrt(np.maximum(b, 0) + rv)
        np.maximum(smooth, 0, out=smooth)
        out[y0:y1] = np.where(source, np.maximum(image[y0:y1], 0), smooth)
    return out


def _metadata(raw: RawFrame, asm: Assembled, darktime: float) -> dict:
    h = raw.header
    meta = {k: h[k] for k in CARRY_KEYS if k in h}
    meta.update(raw.data_id)
    if "AIRMASS" not in meta and "SECZ" in h:
        meta["AIRMASS"] = h["SECZ"]
    meta["DARKTIME"] = darktime
    meta["BUNIT"] = "electron"
    # The image is in electrons: its gain is 1 e-/unit.  The raw amps' values are kept.
    meta["GAIN"] = 1.0
    meta["RDNOISE"] = float(np.sqrt(np.mean([a.read_noise**2 for a in raw.amps])))
    # Saturation in electrons above the bias (lowest amp, before the flat), for downstream code.
    meta["SATURATE"] = round(float(min(a.gain * (a.saturation - asm.overscan_mean.get(a.name, 0.0))
                                       for a in raw.amps)), 1)
    meta["NAMPS"] = len(raw.amps)
    for a in raw.amps:
        meta[f"GAIN{a.name}"] = a.gain
        meta[f"RDNOISE{a.name}"] = a.read_noise
        if np.isfinite(asm.overscan_residual[a.name]):  # no overscan, no residual (FITS has no NaN)
            meta[f"OSCRES{a.name}"] = round(asm.overscan_residual[a.name], 4)
    meta["RAWFILE"] = str(raw.path)[-68:]
    return meta


def raw_wcs(header) -> WCS | None:
    """The raw's rough TAN WCS (it refers to the assembled, trimmed grid), or None."""
    if "CTYPE1" not in header:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            w = WCS(header, naxis=2)
        except Exception:  # a malformed rough WCS is not fatal: characterize fits its own
            log.warning("raw WCS could not be parsed; postisr carries none")
            return None
    return w if w.has_celestial else None


# ---------------------------------------------------------------- cosmic rays
_OFF9 = np.arange(-4, 5)


def _laplacian_plus(img: np.ndarray, rows: int = 32) -> np.ndarray:
    """L+ of L.A.Cosmic: Laplacian of the 2x block-replicated image, negatives clipped,
    block-averaged back (float32).

    On a 2x-replicated image each sub-pixel's Laplacian is 2c - (vertical neighbour)
    - (horizontal neighbour) of the original pixel, so no 4x array is needed.
    Computed in blocks of ``rows`` rows whose temporaries stay in cache (the
    whole-image version is memory-bound and 2x slower; same values).
    """
    # Mirror at the edges: a replicated edge pixel would halve a cosmic ray's Laplacian there.
    p = np.pad(img, 1, mode="reflect")
    ny, nx = img.shape
    out = np.empty(img.shape, np.float32)
    c2, t, u = (np.empty((rows, nx), np.float32) for _ in range(3))
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        n = y1 - y0
        o, cc, tt, uu = out[y0:y1], c2[:n], t[:n], u[:n]
        np.multiply(p[y0 + 1 : y1 + 1, 1:-1], 2, out=cc)
        o[...] = 0
        for v in (p[y0:y1, 1:-1], p[y0 + 2 : y1 + 2, 1:-1]):
            np.subtract(cc, v, out=tt)
            for h in (p[y0 + 1 : y1 + 1, :-2], p[y0 + 1 : y1 + 1, 2:]):
                np.subtract(tt, h, out=uu)
                np.maximum(uu, 0, out=uu)
                o += uu
    out *= 0.25
    return out


def _reflect(i, n):
    """Indices mirrored into [0, n) about the edge pixels (numpy 'reflect' padding)."""
    i = np.abs(i)
    i = np.where(i > n - 1, 2 * (n - 1) - i, i)
    return np.clip(i, 0, n - 1)


def _gather(a, ys, xs, offsets) -> np.ndarray:
    """a[ys+dy, xs+dx] for all offset pairs, mirrored at the edges: shape (n, len, len)."""
    ny, nx = a.shape
    yy = _reflect(ys[:, None, None] + offsets[None, :, None], ny)
    xx = _reflect(xs[:, None, None] + offsets[None, None, :], nx)
    return a[yy, xx]


def _median_last(a: np.ndarray) -> np.ndarray:
    """Median over the last axis of odd length (partition only: faster than np.median)."""
    k = a.shape[-1] // 2
    return np.partition(a, k, axis=-1)[..., k]


def _lplus_windows(c: np.ndarray) -> np.ndarray:
    """L+ at the inner pixels of windows c (n, m, m) -> (n, m-2, m-2)."""
    c2 = 2 * c[:, 1:-1, 1:-1]
    lp = np.zeros(c2.shape, np.float32)
    for v in (c[:, :-2, 1:-1], c[:, 2:, 1:-1]):
        for h in (c[:, 1:-1, :-2], c[:, 1:-1, 2:]):
            lp += np.maximum(c2 - v - h, 0)
    return lp * 0.25


def _noise(floor, scale, ys, xs, m5, off):
    fl = _gather(floor, ys, xs, off) if np.ndim(floor) else floor
    sc = _gather(scale, ys, xs, off) if np.ndim(scale) else scale
    return np.sqrt(np.maximum(fl + sc * np.maximum(m5, 0), 1e-6))


def _distinct_pixels(ys, xs, offsets, shape):
    """The distinct pixels (mirrored at the edges) of the boxes ys+dy, xs+dx, and for each
    box entry its index among them: (py, px, inv) with inv of shape (n, len, len).

    Mirroring is symmetric, so a box statistic centred on the mirrored pixel equals the
    one centred on the pixel beyond the edge.  A flag image instead of np.unique: no sort.
    """
    ny, nx = shape
    lin = (_reflect(ys[:, None, None] + offsets[None, :, None], ny) * nx
           + _reflect(xs[:, None, None] + offsets[None, None, :], nx))
    flag = np.zeros(ny * nx, bool)
    flag[lin.ravel()] = True
    uniq = np.flatnonzero(flag)
    del flag
    ids = np.empty(ny * nx, np.int32)
    ids[uniq] = np.arange(uniq.size, dtype=np.int32)
    return uniq // nx, uniq % nx, ids[lin]


def _local_stats(img, floor, scale, ys, xs, thresh=-np.inf, fine=True):
    """Exact L.A.Cosmic statistics at pixels (ys, xs).

    Returns (S', fine structure F / N), from 9x9 windows:
    N = sqrt(floor + scale * max(med5(I), 0)); S = L+ / (2 N);
    S' = S - med5(S); F = med3(I) - med7(med3(I)).
    Since L+ >= 0, S' <= S at the centre: pixels whose central S is not above
    ``thresh`` are settled with 25 pixels each (S' reported as -inf, F as 1).
    F and the peak are computed only where S' > ``thresh`` (elsewhere F = 1, peak 0).
    """
    n = len(ys)
    sp = np.full(n, -np.inf, np.float32)
    fs = np.ones(n, np.float32)
    pk = np.zeros(n, np.float32)
    if n == 0:
        return (sp, fs, pk) if fine else (sp, fs)
    # Stage 1: S at the centre only (5x5 window).
    w5 = _gather(img, ys, xs, _OFF9[2:-2]).astype(np.float32, copy=False)
    m5c = _median_last(w5.reshape(n, 25))
    lpc = _lplus_windows(w5[:, 1:-1, 1:-1])[:, 0, 0]
    nc = _noise(floor, scale, ys, xs, m5c[:, None, None], np.zeros(1, int))[:, 0, 0]
    go = np.nonzero(lpc / (2 * nc) > thresh)[0]
    if go.size == 0:
        return (sp, fs, pk) if fine else (sp, fs)
    ys, xs = ys[go], xs[go]
    k = go.size
    # Stage 2: the full statistics at the 5x5 pixels around each candidate.  Candidates
    # cluster (star cores), so each statistic is computed once per distinct pixel.
    uy, ux, inv = _distinct_pixels(ys, xs, _OFF9[2:-2], img.shape)  # inv: (k, 5, 5)
    w5 = _gather(img, uy, ux, _OFF9[2:-2]).astype(np.float32, copy=False)
    m5u = _median_last(w5.reshape(len(uy), 25))
    lpu = _lplus_windows(w5[:, 1:-1, 1:-1])[:, 0, 0]
    del w5
    noise_u = _noise(floor, scale, uy, ux, m5u[:, None, None], np.zeros(1, int))[:, 0, 0]
    s = (lpu / (2 * noise_u))[inv]
    spk = s[:, 2, 2] - _median_last(s.reshape(k, 25))
    sp[go] = spk
    if fine:
        # Fine structure only where S' passes ``thresh``: every caller tests S' > thresh
        # first (most candidates are star pixels, whose S' the 5x5 median takes away).
        sel = np.nonzero(spk > thresh)[0]
        if sel.size:
            y3, x3, inv3 = _distinct_pixels(ys[sel], xs[sel], _OFF9[1:-1], img.shape)  # (n, 7, 7)
            m3 = _median_last(_gather(img, y3, x3, _OFF9[3:-3]).astype(np.float32, copy=False)
                              .reshape(len(y3), 9))[inv3]
            f = m3[:, 3, 3] - _median_last(m3.reshape(sel.size, 49))
            nz = noise_u[inv[sel, 2, 2]]
            fs[go[sel]] = np.maximum(f / nz, 0.01)
            # How far the pixel stands above its own 3x3 median, in noise sigmas.
            pk[go[sel]] = (img[ys[sel], xs[sel]] - m3[:, 3, 3]) / nz
    return (sp, fs, pk) if fine else (sp, fs)


def _neighbours(ys, xs, shape, radius=1):
    """Unique pixels within ``radius`` (square) of the given ones, clamped to the image."""
    off = np.arange(-radius, radius + 1)
    yy = np.clip(ys[:, None, None] + off[None, :, None], 0, shape[0] - 1)
    xx = np.clip(xs[:, None, None] + off[None, None, :], 0, shape[1] - 1)
    flat = np.unique((yy.astype(np.int64) * shape[1] + xx).ravel())
    return flat // shape[1], flat % shape[1]


def _dilate_sparse(m: np.ndarray, radius: int) -> np.ndarray:
    ys, xs = np.nonzero(m)
    out = m.copy()
    yy, xx = _neighbours(ys, xs, m.shape, radius)
    out[yy, xx] = True
    return out


def _coarse_background(img, block=64, low=True) -> np.ndarray:
    """Local background: block medians of a 4x-thinned image, expanded to full size
    (float32); with ``low``, the minimum over neighbouring blocks (a low estimate)."""
    ny, nx = img.shape
    by, bx = max(1, -(-ny // block)), max(1, -(-nx // block))
    thin = img[::4, ::4]
    ty, tx = -(-thin.shape[0] // by) * by, -(-thin.shape[1] // bx) * bx
    padded = np.pad(thin, ((0, ty - thin.shape[0]), (0, tx - thin.shape[1])), mode="edge")
    med = np.median(padded.reshape(by, ty // by, bx, tx // bx).transpose(0, 2, 1, 3).reshape(by, bx, -1), axis=-1)
    if low:
        med = ndimage.minimum_filter(med, size=3, mode="nearest")
    full = np.repeat(np.repeat(med, -(-ny // by), axis=0), -(-nx // bx), axis=1)[:ny, :nx]
    return full.astype(np.float32)


def _clean_values(img, cr, ys, xs) -> np.ndarray:
    """Median of the non-CR pixels in the 5x5 box around each (ys, xs)."""
    off5 = _OFF9[2:-2]
    win = _gather(img, ys, xs, off5).astype(np.float32)
    bad = _gather(cr, ys, xs, off5)
    win[bad] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vals = np.nanmedian(win.reshape(len(ys), 25), axis=1)
    return np.where(np.isfinite(vals), vals, 0.0).astype(np.float32)


def _fill_along_rows(img, bad) -> None:
    """Interpolate ``bad`` pixels of ``img`` in place, linearly between the nearest good
    pixels on the same row (bad columns and bleed trails are vertical).

    Works on the runs of bad pixels, so its cost grows with their number, not
    with the image size.
    """
    ny, nx = img.shape
    padded = np.zeros((ny, nx + 2), np.int8)
    padded[:, 1:-1] = bad
    d = np.diff(padded.ravel())
    starts = np.flatnonzero(d == 1) + 1
    ends = np.flatnonzero(d == -1) + 1
    if starts.size == 0:
        return
    row = starts // (nx + 2)
    c0 = starts % (nx + 2) - 1  # first bad column
    c1 = ends % (nx + 2) - 1  # one past the last bad column
    lv = img[row, np.maximum(c0 - 1, 0)]
    rv = img[row, np.minimum(c1, nx - 1)]
    lv = np.where(c0 == 0, rv, lv)
    rv = np.where(c1 == nx, lv, rv)
    length = c1 - c0
    rr = np.repeat(row, length)
    first = np.repeat(c0, length)
    cc = np.arange(rr.size) - np.repeat(np.cumsum(length) - length, length) + first
    w = (cc - first + 1) / np.repeat(length + 1, length)
    img[rr, cc] = np.repeat(lv, length) + w * np.repeat(rv - lv, length)


def find_cosmic_rays(image, noise_floor, poisson_scale=1.0, exclude=None, sigclip=4.5,
                     sigfrac=0.3, objlim=3.0, niter=4):
    """L.A.Cosmic (van Dokkum 2001) cosmic-ray detection.

    image : electrons (sky included: the noise model needs it).
    noise_floor : variance (e-^2) besides the Poisson noise of the signal
        (read noise, dark, calibration noise), scalar or per pixel.
    poisson_scale : variance per electron of signal (1/flat), scalar or per pixel.
    exclude : pixels never flagged (BAD, SAT); they are interpolated along rows first
        so that their edges do not look like cosmic rays.

    A pixel is a cosmic ray when S' = L+/(2N) - med5(L+/(2N)) > sigclip (sharp
    against the noise N from the 5x5 median) and S'/(F/N) > objlim (sharper
    than stars: F is the fine structure med3 - med7(med3)).  Flagged pixels
    are replaced by local medians and grow to neighbours with S' > sigclip,
    then to their neighbours with S' > sigfrac * sigclip; the search repeats
    near replaced pixels up to ``niter`` times.

    Speed: the median filters are evaluated only at candidate pixels (those
    whose L+ passes sigclip against a noise floor from a coarse background,
    then against the exact noise at the pixel), never over the whole image.
    Returns (cr bool mask, cleaned image).
    """
    img = np.array(image, np.float32)
    shape = img.shape
    exclude = np.zeros(shape, bool) if exclude is None else exclude
    if exclude.any():
        _fill_along_rows(img, exclude)
    cr = np.zeros(shape, bool)
    bkg = _coarse_background(img)
    low_noise = bkg
    np.maximum(bkg, 0, out=low_noise)
    low_noise *= poisson_scale
    low_noise += noise_floor
    np.sqrt(low_noise, out=low_noise)
    # First pass over the whole image with the cheap noise bound.
    lplus = _laplacian_plus(img)
    lplus /= low_noise
    cand = lplus > 2 * sigclip
    del lplus
    cand &= ~exclude
    ys, xs = np.nonzero(cand)
    del cand
    for it in range(max(int(niter), 1)):
        if ys.size == 0:
            break
        sp, fine, peak = _local_stats(img, noise_floor, poisson_scale, ys, xs, thresh=sigclip)
        # A seed must also stand out of its own 3x3 neighbourhood: the edge of a step
        # (an unilluminated strip, a vignetted corner) is sharp but is no peak.
        hit = (sp > sigclip) & (sp / fine > objlim) & (peak > 0.5 * sigclip)
        hy, hx = ys[hit], xs[hit]
        if hy.size == 0:
            break
        cr[hy, hx] = True
        img[hy, hx] = _clean_values(img, cr, hy, hx)
        new_y, new_x = [hy], [hx]
        # Grow: neighbours with S' > sigclip, then neighbours of those with S' > sigfrac*sigclip.
        # S' is evaluated after the confirmed pixels are replaced, so that a bright
        # pixel does not hide the fainter charge next to it along the track.
        # Stage 0 grows from the seeds at sigclip, stage 1 from everything found so far at
        # sigfrac x sigclip (two steps, as L.A.Cosmic: more would eat into a star that a
        # cosmic ray hit, since growth has no fine-structure test).
        last = (hy, hx)
        for stage, thresh in enumerate((sigclip, sigfrac * sigclip)):
            front = (np.concatenate(new_y), np.concatenate(new_x)) if stage == 1 else last
            gy, gx = _neighbours(*front, shape)
            keep = ~cr[gy, gx] & ~exclude[gy, gx]
            gy, gx = gy[keep], gx[keep]
            gsp, _, gpk = _local_stats(img, noise_floor, poisson_scale, gy, gx, thresh=thresh)
            sel = (gsp > thresh) & (gpk > 0.5 * thresh)
            gy, gx = gy[sel], gx[sel]
            if gy.size == 0:
                if stage == 0:
                    continue
                break
            cr[gy, gx] = True
            img[gy, gx] = _clean_values(img, cr, gy, gx)
            new_y.append(gy)
            new_x.append(gx)
            last = (gy, gx)
        nys, nxs = np.concatenate(new_y), np.concatenate(new_x)
        log.debug("L.A.Cosmic iteration %d: %d new CR pixels", it + 1, nys.size)
        # Next pass: only pixels near the replaced ones can change.
        ys, xs = _neighbours(nys, nxs, shape, radius=2)
        keep = ~cr[ys, xs] & ~exclude[ys, xs]
        ys, xs = ys[keep], xs[keep]
        if ys.size:
            lp = _lplus_windows(_gather(img, ys, xs, np.arange(-1, 2)))[:, 0, 0]
            sel = lp > 2 * sigclip * low_noise[ys, xs]
            ys, xs = ys[sel], xs[sel]
    return cr, img


# ---------------------------------------------------------------- file level
def select_flat(flat_paths, raw: RawFrame) -> str | None:
    """The master flat among ``flat_paths`` whose band is the raw's (FILTER)."""
    if flat_paths is None or isinstance(flat_paths, (str, bytes)) or hasattr(flat_paths, "__fspath__"):
        return flat_paths
    flat_paths = list(flat_paths)
    if not flat_paths:
        return None
    band = str(raw.data_id.get("band", "")).strip()
    found = {}
    for p in flat_paths:
        try:
            h = fits.getheader(p, 0)
        except OSError as exc:
            raise DiapipeError(f"cannot read master flat ({exc})", p, raw.data_id) from exc
        ids = json.loads(h.get("DATAID", "{}"))
        found[str(ids.get("band", h.get("FILTER", "")))] = p
    if band not in found:
        raise raw.error(f"no master flat for band {band!r} (have {sorted(found)})")
    return found[band]


def isr_file(raw_path, out_path, bias_path=None, dark_path=None, flat_path=None,
             config: dict | None = None, data_id: dict | None = None) -> Exposure:
    """Read a raw and the masters, run ISR, write the postisr Exposure atomically.

    ``flat_path`` may be one file or a list of master flats of several bands:
    the one matching the raw's FILTER is used.
    """
    raw = read_raw(raw_path, data_id)
    flat_path = select_flat(flat_path, raw)
    masters = [Exposure.read(p) if p else None for p in (bias_path, dark_path, flat_path)]
    exp = run_isr(raw, *masters, config=config)
    for label, p in (("BIASFILE", bias_path), ("DARKFILE", dark_path), ("FLATFILE", flat_path)):
        if p:
            exp.metadata[label] = str(p)[-68:]
    exp.write(out_path)
    log.info(
        "isr %s -> %s: %d CR, %d SAT pixels; overscan residuals %s ADU",
        raw_path, out_path, exp.metadata["NCRPIX"], exp.metadata["NSATPIX"],
        {a.name: exp.metadata.get(f"OSCRES{a.name}") for a in raw.amps},
    )
    return exp


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("isr", help="instrument signature removal of one raw frame")
    p.add_argument("raw", help="raw FITS frame")
    p.add_argument("-o", "--output", required=True, help="output postisr Exposure FITS")
    p.add_argument("--bias", help="master bias Exposure (e-)")
    p.add_argument("--dark", help="master dark Exposure (e-/s)")
    p.add_argument("--flat", help="master flat Exposure (unit mean)")
    p.add_argument("--config", help="YAML file with an isr block (or the full pipeline config)")
    p.add_argument("--no-cr", action="store_true", help="skip cosmic-ray detection")
    p.add_argument("--band", help="band, for raws whose header has no FILTER card")
    p.add_argument("--visit", type=int, help="visit (checked against EXPNUM; used in messages)")
    p.add_argument("--detector", type=int, help="detector (checked against DETECTOR; used in messages)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from . import logs

    logs.setup()
    cfg = {}
    if args.config:
        import yaml

        with open(args.config) as fh:
            loaded = yaml.safe_load(fh) or {}
        cfg = loaded.get("isr", loaded)
    if args.no_cr:
        cfg["cr_detect"] = False
    data_id = {k: getattr(args, k) for k in ("visit", "detector", "band") if getattr(args, k) is not None}
    isr_file(args.raw, args.output, args.bias, args.dark, args.flat, cfg, data_id=data_id or None)
    return 0
