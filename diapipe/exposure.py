"""Exposure = metadata + MaskedImage (image, mask, variance) + WCS + PSF.

On disk one multi-extension FITS file that DS9 and plain astropy open:

    PRIMARY   metadata (dataId, MJD, exposure time, band, zero point, ...)
    IMAGE     float32, with the FITS WCS (TAN-SIP) in its header
    MASK      int32 bit planes, names in ``HIERARCH MP_<NAME>`` cards
    VARIANCE  float32
    PSF       optional: the PixelPsf basis (see ``diapipe.psf``)

Units: IMAGE in electrons unless the header's BUNIT says otherwise (calexps
keep electrons and carry the zero point MAGZERO, the AB magnitude of 1 e-).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from . import masks
from .fileio import DiapipeError, write_fits
from .psf import PixelPsf

_STANDARD_HDUS = ("PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF")

# Keys that describe the data, not the file; written to PRIMARY and read back.
DATA_ID_KEYS = ("visit", "detector", "band", "patch")


@dataclass
class MaskedImage:
    """Image, bit mask and variance on one pixel grid (all shape (ny, nx))."""

    image: np.ndarray
    mask: np.ndarray | None = None
    variance: np.ndarray | None = None

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        if self.mask is None:
            self.mask = np.zeros(self.image.shape, dtype=masks.MASK_DTYPE)
        else:
            self.mask = np.asarray(self.mask, dtype=masks.MASK_DTYPE)
        if self.variance is None:
            self.variance = np.ones(self.image.shape, dtype=np.float32)
        else:
            self.variance = np.asarray(self.variance, dtype=np.float32)
        if not (self.image.shape == self.mask.shape == self.variance.shape):
            raise ValueError(
                f"image {self.image.shape}, mask {self.mask.shape} and variance "
                f"{self.variance.shape} must have one shape"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape


@dataclass
class Exposure:
    """A calibrated (or raw-derived) exposure: pixels plus everything needed to use them.

    ``metadata`` holds FITS-safe scalars (str, int, float, bool): dataId keys
    (visit, detector, band, patch), MJD-OBS, EXPTIME, MAGZERO, SEEING, ...
    """

    masked_image: MaskedImage
    wcs: WCS | None = None
    psf: PixelPsf | None = None
    metadata: dict = field(default_factory=dict)
    #: Further HDUs written after the standard ones and read back as they are
    #: (e.g. a diffexp's KERNEL / STAMPS diagnostics); empty for most exposures.
    extra_hdus: list = field(default_factory=list)

    # Convenience accessors, as afw does.
    @property
    def image(self) -> np.ndarray:
        return self.masked_image.image

    @property
    def mask(self) -> np.ndarray:
        return self.masked_image.mask

    @property
    def variance(self) -> np.ndarray:
        return self.masked_image.variance

    @property
    def shape(self) -> tuple[int, int]:
        return self.masked_image.shape

    @property
    def data_id(self) -> dict:
        return {k: self.metadata[k] for k in DATA_ID_KEYS if k in self.metadata}

    def copy(self) -> "Exposure":
        mi = self.masked_image
        return Exposure(
            MaskedImage(mi.image.copy(), mi.mask.copy(), mi.variance.copy()),
            wcs=self.wcs.deepcopy() if self.wcs is not None else None,
            psf=PixelPsf(self.psf.components.copy(), self.psf.order, self.psf.x0, self.psf.y0,
                         self.psf.sx, self.psf.sy) if self.psf is not None else None,
            metadata=dict(self.metadata),
            extra_hdus=[h.copy() for h in self.extra_hdus],
        )

    # ------------------------------------------------------------------ I/O
    def to_hdulist(self) -> fits.HDUList:
        primary = fits.PrimaryHDU()
        for key, value in self.metadata.items():
            primary.header[_card_key(key)] = _fits_value(value)
        primary.header["DATAID"] = (json.dumps(self.data_id, sort_keys=True), "dataId as JSON")
        image_header = self.wcs.to_header(relax=True) if self.wcs is not None else fits.Header()
        if self.wcs is not None and self.wcs.sip is not None:
            # astropy drops -SIP from CTYPE in to_header(relax=True) only when asked; keep it explicit.
            image_header["CTYPE1"] = "RA---TAN-SIP"
            image_header["CTYPE2"] = "DEC--TAN-SIP"
        image_header["BUNIT"] = self.metadata.get("BUNIT", "electron")
        hdus = [
            primary,
            fits.ImageHDU(self.image, header=image_header, name="IMAGE"),
            fits.ImageHDU(self.mask, name="MASK"),
            fits.ImageHDU(self.variance, name="VARIANCE"),
        ]
        for name, b, comment in masks.header_cards():
            hdus[2].header[name] = (b, comment)
        if self.wcs is not None:
            # DS9 aligns frames by WCS: give the mask and variance the same one.
            for h in hdus[2:4]:
                h.header.update(self.wcs.to_header(relax=True))
        if self.psf is not None:
            hdus.append(self.psf.to_hdu())
        hdus.extend(self.extra_hdus)
        # Lets the reader notice a file cut exactly at an HDU boundary.
        primary.header["NEXTEND"] = (len(hdus) - 1, "number of extensions")
        return fits.HDUList(hdus)

    def write(self, path) -> None:
        """Write atomically to ``path`` (multi-extension FITS)."""
        write_fits(self.to_hdulist(), path)

    @classmethod
    def read(cls, path) -> "Exposure":
        """Read an Exposure file; raise DiapipeError naming the file if it is not one."""
        try:
            with warnings.catch_warnings():
                # astropy only *warns* about a truncated file or a failed checksum and
                # then returns partial data (a missing VARIANCE would silently become
                # ones): make both errors, since a damaged product must not be used.
                warnings.filterwarnings("error", message=r".*truncated.*")
                warnings.filterwarnings("error", message=r".*(Checksum|Datasum) verification failed.*")
                warnings.simplefilter("ignore", FITSFixedWarning)
                hdul = fits.open(path, memmap=False, checksum=True)
                for hdu in hdul:
                    hdu.data  # noqa: B018 - load now, inside the warning filter
                # astropy reports a truncated file only through its logger: check the size.
                last = hdul.fileinfo(len(hdul) - 1)
                size = os.path.getsize(path)
                if last["datLoc"] + last["datSpan"] > size:
                    hdul.close()
                    raise DiapipeError(
                        f"truncated file ({size} bytes, the headers promise {last['datLoc'] + last['datSpan']})",
                        path,
                    )
                nextend = hdul[0].header.get("NEXTEND")
                if nextend is not None and len(hdul) - 1 < nextend:
                    hdul.close()
                    raise DiapipeError(f"truncated file ({len(hdul) - 1} of {nextend} extensions)", path)
        except DiapipeError:
            raise
        except (OSError, ValueError, TypeError, KeyError, Warning) as exc:
            raise DiapipeError(f"cannot read Exposure ({exc})".replace("\n", " "), path) from exc
        try:
            with hdul:
                names = [h.name for h in hdul]
                if "IMAGE" not in names:
                    raise DiapipeError(f"not an Exposure file (no IMAGE HDU; has {names})", path)
                meta = _metadata_from_header(hdul[0].header)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FITSFixedWarning)
                    wcs = WCS(hdul["IMAGE"].header) if "CTYPE1" in hdul["IMAGE"].header else None
                image = hdul["IMAGE"].data
                mask = hdul["MASK"].data if "MASK" in names else None
                if mask is not None and "MASK" in names:
                    planes = masks.planes_from_header(hdul["MASK"].header)
                    if planes != masks.MASK_PLANES:
                        mask = _remap_mask(mask, planes)
                variance = hdul["VARIANCE"].data if "VARIANCE" in names else None
                psf = PixelPsf.from_hdu(hdul["PSF"]) if "PSF" in names else None
                # BUNIT lives in the IMAGE header; keep it in the metadata only when it
                # says something (not our default), so a round trip adds no key.
                bunit = hdul["IMAGE"].header.get("BUNIT")
                if bunit is not None and "BUNIT" not in meta and bunit != "electron":
                    meta["BUNIT"] = bunit
                extra = [h.copy() for h in hdul[1:] if h.name not in _STANDARD_HDUS]
        except DiapipeError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise DiapipeError(f"cannot read Exposure ({exc})", path) from exc
        return cls(MaskedImage(image, mask, variance), wcs=wcs, psf=psf, metadata=meta, extra_hdus=extra)


def _card_key(key: str) -> str:
    return key if len(key) <= 8 and key.upper() == key else f"HIERARCH {key}"


def _fits_value(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


_SKIP = {"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "NEXTEND", "DATAID", "CHECKSUM", "DATASUM", "COMMENT", "HISTORY", ""}


def _metadata_from_header(header) -> dict:
    meta = {}
    for key, value in header.items():
        if key in _SKIP or key.startswith("NAXIS"):
            continue
        meta[key] = value
    if "DATAID" in header:
        meta.update(json.loads(header["DATAID"]))
    return meta


def _remap_mask(mask: np.ndarray, planes: dict[str, int]) -> np.ndarray:
    """Translate a mask written with another plane numbering into ours."""
    out = np.zeros(mask.shape, dtype=masks.MASK_DTYPE)
    for name, b in planes.items():
        if name in masks.MASK_PLANES:
            out[(mask & (1 << b)) != 0] |= masks.bit(name)
    return out
