"""Astrometric calibration: match detections to a reference catalog and fit a TAN-SIP WCS.

1. Pattern match (robust to a pointing tens of arcseconds off and a small
   rotation): the brightest reference stars are projected with the rough WCS;
   for each trial rotation about the detector centre every (source - reference)
   pixel offset votes in a 2-D histogram.  The true offset is the one bin where
   many pairs agree (the same shift for all stars); wrong pairs spread out.
   The peak must stand far above the histogram's background, else the match
   failed and we say so.
2. Iterative fit: match by nearest neighbour within a shrinking radius, fit a
   TAN projection plus SIP polynomial distortion of ``order`` (forward A/B and
   inverse AP/BP), reject outliers at ``clip`` sigma, repeat.

The fit is linear: reference positions are projected on the tangent plane at
CRVAL, and xi, eta are polynomials in the pixel offsets from CRPIX (the
detector centre).  The constant terms move CRVAL, the linear ones are the CD
matrix, higher ones are CD x SIP.  Pixel coordinates are 0-based (pixel
centres at integers), as in numpy, sep and astropy's ``origin=0``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS, Sip
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

MAS_PER_DEG = 3.6e6
# With fewer matches than this the distortion is fitted as radial about an unknown
# axis (fit_tan_radial, 3 parameters) instead of a free SIP polynomial.
RADIAL_BELOW = 80


class AstrometryError(RuntimeError):
    """The match or the fit failed (too few stars, no significant match)."""


def gnomonic(ra, dec, ra0, dec0):
    """Tangent-plane coordinates (xi, eta) in degrees of (ra, dec) about (ra0, dec0), all degrees."""
    ra, dec = np.deg2rad(ra), np.deg2rad(dec)
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    cosc = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    xi = np.cos(dec) * np.sin(ra - a0) / cosc
    eta = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    return np.rad2deg(xi), np.rad2deg(eta)


def inverse_gnomonic(xi, eta, ra0, dec0):
    """(ra, dec) in degrees of tangent-plane (xi, eta) degrees about (ra0, dec0)."""
    x, y = np.deg2rad(xi), np.deg2rad(eta)
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        dec = np.arcsin(np.cos(c) * np.sin(d0) + np.where(rho > 0, y * np.sin(c) * np.cos(d0) / rho, 0))
        ra = a0 + np.arctan2(x * np.sin(c), rho * np.cos(d0) * np.cos(c) - y * np.sin(d0) * np.sin(c))
    return np.rad2deg(ra) % 360, np.rad2deg(dec)


def sky_offset_mas(ra1, dec1, ra2, dec2):
    """Components (dra*cos(dec), ddec) in mas between two sets of positions."""
    dra = ((np.asarray(ra1) - np.asarray(ra2) + 180) % 360 - 180) * np.cos(np.deg2rad(dec2))
    return dra * MAS_PER_DEG, (np.asarray(dec1) - np.asarray(dec2)) * MAS_PER_DEG


# --------------------------------------------------------------- pattern match
@dataclass
class PatternMatch:
    dx: float  # pixel shift to add to the rotated reference positions
    dy: float
    rotation_deg: float  # rotation of reference positions about the centre
    n_votes: int
    significance: float


def _rotate(x, y, cx, cy, theta_deg):
    t = np.deg2rad(theta_deg)
    c, s = np.cos(t), np.sin(t)
    return cx + c * (x - cx) - s * (y - cy), cy + s * (x - cx) + c * (y - cy)


def pattern_match(src_x, src_y, ref_x, ref_y, centre, max_offset_px: float,
                  max_rotation_deg: float, tolerance_px: float = 2.0,
                  min_votes: int = 6, min_significance: float = 8.0) -> PatternMatch:
    """Find the shift (and small rotation) that maps reference pixel positions onto sources.

    src_x, src_y : the brightest detections (pixels).
    ref_x, ref_y : the brightest reference stars projected with the rough WCS (pixels).
    centre : (cx, cy) rotation centre (pixels).
    max_offset_px : largest shift searched (pixels; the pointing uncertainty).
    max_rotation_deg : largest rotation searched (degrees).
    tolerance_px : histogram bin (pixels); the positions must agree this well
        after the shift, including rotation-grid and scale errors.

    Raises AstrometryError if no offset stands out.
    """
    src_x, src_y = np.asarray(src_x, float), np.asarray(src_y, float)
    cx, cy = centre
    rmax = np.hypot(ref_x - cx, ref_y - cy).max() if len(ref_x) else 1.0
    # rotation step: displacement at the edge stays below half a bin
    step = np.rad2deg(0.5 * tolerance_px / max(rmax, 1.0))
    n_rot = int(np.ceil(max_rotation_deg / step)) if max_rotation_deg > 0 else 0
    thetas = np.linspace(-max_rotation_deg, max_rotation_deg, 2 * n_rot + 1) if n_rot else [0.0]
    nbin = int(np.ceil(2 * max_offset_px / tolerance_px))
    edges = np.linspace(-max_offset_px, max_offset_px, nbin + 1)
    best = None
    for theta in thetas:
        rx, ry = _rotate(np.asarray(ref_x), np.asarray(ref_y), cx, cy, theta)
        ddx = (src_x[:, None] - rx[None, :]).ravel()
        ddy = (src_y[:, None] - ry[None, :]).ravel()
        keep = (np.abs(ddx) < max_offset_px) & (np.abs(ddy) < max_offset_px)
        h, _, _ = np.histogram2d(ddx[keep], ddy[keep], bins=[edges, edges])
        # 2x2 box sum so a true offset split over bin edges still counts in full
        h2 = h[:-1, :-1] + h[1:, :-1] + h[:-1, 1:] + h[1:, 1:]
        i, j = np.unravel_index(np.argmax(h2), h2.shape)
        peak = h2[i, j]
        if best is None or peak > best[0]:
            bg = max(keep.sum() * 4.0 / h.size, 0.25)
            best = (peak, theta, edges[i + 1], edges[j + 1], bg, ddx[keep], ddy[keep])
    peak, theta, ox, oy, bg, ddx, ddy = best
    significance = (peak - bg) / np.sqrt(bg + 1)
    if peak < min_votes or significance < min_significance:
        raise AstrometryError(
            f"pattern match failed: best offset has {int(peak)} agreeing pairs "
            f"(need {min_votes}), significance {significance:.1f} (need {min_significance}); "
            f"searched +-{max_offset_px:.0f} px and +-{max_rotation_deg} deg"
        )
    # refine the offset: median of the pairs in the peak's 2x2 bins
    sel = (np.abs(ddx - ox) < tolerance_px) & (np.abs(ddy - oy) < tolerance_px)
    return PatternMatch(float(np.median(ddx[sel])), float(np.median(ddy[sel])), float(theta),
                        int(peak), float(significance))


# --------------------------------------------------------------------- TAN-SIP
def _terms(order, min_order=0):
    return [(p, n - p) for n in range(min_order, order + 1) for p in range(n, -1, -1)]


def _design(u, v, terms, scale):
    us, vs = u / scale, v / scale
    return np.stack([us**p * vs**q for p, q in terms], axis=1)


def fit_tan_sip(x, y, ra, dec, crpix0, crval, order: int = 3, weights=None, n_iter: int = 3) -> WCS:
    """Least-squares TAN-SIP WCS through matched (x, y) <-> (ra, dec).

    x, y : 0-based pixel positions; crpix0 : 0-based reference pixel (kept fixed);
    crval : starting tangent point (deg), refined so the constant terms vanish.
    order : SIP polynomial order (1 = plain TAN with a free CD matrix).
    weights : per-star inverse variance (any consistent unit), or None.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    u, v = x - crpix0[0], y - crpix0[1]
    scale = max(np.abs(u).max(), np.abs(v).max(), 1.0)
    terms = _terms(order)
    a_mat = _design(u, v, terms, scale)
    sw = np.sqrt(np.ones(len(x)) if weights is None else np.asarray(weights, float))
    ra0, dec0 = crval
    for _ in range(n_iter):
        xi, eta = gnomonic(ra, dec, ra0, dec0)
        cxi, *_ = np.linalg.lstsq(a_mat * sw[:, None], xi * sw, rcond=None)
        ceta, *_ = np.linalg.lstsq(a_mat * sw[:, None], eta * sw, rcond=None)
        # constant terms: the sky position of CRPIX is not the current tangent point
        ra0, dec0 = inverse_gnomonic(cxi[0], ceta[0], ra0, dec0)
    # undo the normalisation: coefficient of u^p v^q is c / scale^(p+q)
    norm = np.array([scale ** (p + q) for p, q in terms])
    cxi, ceta = cxi / norm, ceta / norm
    cd = np.array([[cxi[terms.index((1, 0))], cxi[terms.index((0, 1))]],
                   [ceta[terms.index((1, 0))], ceta[terms.index((0, 1))]]])
    w = WCS(naxis=2)
    w.wcs.crpix = [crpix0[0] + 1, crpix0[1] + 1]
    w.wcs.crval = [ra0, dec0]
    w.wcs.cd = cd
    if order < 2:
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.set()
        return w
    cdinv = np.linalg.inv(cd)
    a = np.zeros((order + 1, order + 1))
    b = np.zeros((order + 1, order + 1))
    for k, (p, q) in enumerate(terms):
        if p + q >= 2:
            a[p, q], b[p, q] = cdinv @ np.array([cxi[k], ceta[k]])
    ap, bp = _inverse_sip(a, b, order, u, v)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.sip = Sip(a, b, ap, bp, w.wcs.crpix)
    w.wcs.set()
    return w


def _radial_basis(u, v):
    """Pixel-space displacement fields (3, 2, N) of a radial cubic distortion about an
    unknown optical axis, r' = r (1 + k |r - c|^2): the k term and its two first-order
    axis-offset terms (constant and linear parts belong to CRVAL and the CD matrix)."""
    r2 = u * u + v * v
    return np.stack([
        np.stack([r2 * u, r2 * v]),
        np.stack([-(3 * u * u + v * v), -2 * u * v]),
        np.stack([-2 * u * v, -(u * u + 3 * v * v)]),
    ])


def fit_tan_radial(x, y, ra, dec, crpix0, crval, weights=None, n_iter: int = 3) -> WCS:
    """TAN WCS plus a radial cubic distortion about an unknown axis, written as SIP order 3.

    The distortion of a rotationally symmetric camera (Seidel distortion) has
    3 free numbers instead of the 14 of a general cubic SIP: a sparse field
    (tens of stars) constrains it to the corners, where a free cubic extrapolates
    its noise.  The CD matrix, CRVAL and the distortion are one weighted linear fit
    of (xi, eta) (the pixel-space basis is mapped through a first-pass CD matrix).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    u, v = x - crpix0[0], y - crpix0[1]
    scale = max(np.abs(u).max(), np.abs(v).max(), 1.0)
    w1 = fit_tan_sip(x, y, ra, dec, crpix0, crval, order=1, weights=weights)
    cd0 = w1.wcs.cd
    ra0, dec0 = w1.wcs.crval
    us, vs = u / scale, v / scale
    basis = _radial_basis(us, vs)  # (3, 2, N), scaled pixel units
    mapped = np.einsum("ij,kjn->kin", cd0, basis) * scale  # (3, 2, N) degrees
    n = len(x)
    one, zero = np.ones(n), np.zeros(n)
    a_xi = np.column_stack([one, us, vs, zero, zero, zero, mapped[:, 0, :].T])
    a_eta = np.column_stack([zero, zero, zero, one, us, vs, mapped[:, 1, :].T])
    a_mat = np.vstack([a_xi, a_eta])
    sw = np.sqrt(np.ones(n) if weights is None else np.asarray(weights, float))
    sw2 = np.concatenate([sw, sw])
    for _ in range(n_iter):
        xi, eta = gnomonic(ra, dec, ra0, dec0)
        c, *_ = np.linalg.lstsq(a_mat * sw2[:, None], np.concatenate([xi, eta]) * sw2, rcond=None)
        ra0, dec0 = inverse_gnomonic(c[0], c[3], ra0, dec0)
    cd = np.array([[c[1], c[2]], [c[4], c[5]]]) / scale
    # pixel-space distortion under the final CD: D = CD^-1 CD0 sum_k c_k B_k, a cubic polynomial
    g = np.linspace(-1, 1, 9)
    gu, gv = (a.ravel() for a in np.meshgrid(g, g))
    dpix = np.linalg.inv(cd) @ cd0 @ np.einsum("k,kjn->jn", c[6:], _radial_basis(gu, gv)) * scale
    terms = _terms(3, 2)
    design = _design(gu * scale, gv * scale, terms, scale)
    ca, *_ = np.linalg.lstsq(design, dpix[0], rcond=None)
    cb, *_ = np.linalg.lstsq(design, dpix[1], rcond=None)
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    for k, (p, q) in enumerate(terms):
        a[p, q] = ca[k] / scale ** (p + q)
        b[p, q] = cb[k] / scale ** (p + q)
    ap, bp = _inverse_sip(a, b, 3, u, v)
    w = WCS(naxis=2)
    w.wcs.crpix = [crpix0[0] + 1, crpix0[1] + 1]
    w.wcs.crval = [ra0, dec0]
    w.wcs.cd = cd
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.sip = Sip(a, b, ap, bp, w.wcs.crpix)
    w.wcs.set()
    return w


def _inverse_sip(a, b, order, u, v):
    """Fit AP, BP (order + 1) so world->pixel needs no iteration; over the fitted area."""
    inv_order = order + 1
    g = np.linspace(-1, 1, 25)
    umin, umax = min(u.min(), -1.0), max(u.max(), 1.0)
    vmin, vmax = min(v.min(), -1.0), max(v.max(), 1.0)
    gu, gv = np.meshgrid(umin + (g + 1) / 2 * (umax - umin), vmin + (g + 1) / 2 * (vmax - vmin))
    gu, gv = gu.ravel(), gv.ravel()
    fwd = _terms(order, 2)
    fu = gu + sum(a[p, q] * gu**p * gv**q for p, q in fwd)
    fv = gv + sum(b[p, q] * gu**p * gv**q for p, q in fwd)
    terms = _terms(inv_order, 1)
    scale = max(np.abs(fu).max(), np.abs(fv).max())
    d = _design(fu, fv, terms, scale)
    cu, *_ = np.linalg.lstsq(d, gu - fu, rcond=None)
    cv, *_ = np.linalg.lstsq(d, gv - fv, rcond=None)
    ap = np.zeros((inv_order + 1, inv_order + 1))
    bp = np.zeros((inv_order + 1, inv_order + 1))
    for k, (p, q) in enumerate(terms):
        ap[p, q] = cu[k] / scale ** (p + q)
        bp[p, q] = cv[k] / scale ** (p + q)
    return ap, bp


def _affordable_order(n_match: int, order: int) -> int:
    """Highest polynomial order <= ``order`` with at least 2 matches per coefficient (+4)."""
    for k in range(order, 0, -1):
        if n_match >= 2 * len(_terms(k)) + 4:
            return k
    return 0


# ---------------------------------------------------------------- whole solve
@dataclass
class AstrometryResult:
    wcs: WCS
    src_index: np.ndarray  # indices into the source arrays of the final matches
    ref_index: np.ndarray  # indices into the refcat of the final matches
    rms_mas: float  # 2-D RMS of the fit residuals of the matches kept (mas)
    n_matched: int
    pattern: PatternMatch


def solve(x, y, flux, usable, ref_ra, ref_dec, ref_mag, ref_err_mas, rough_wcs: WCS,
          shape, *, order=3, max_offset_arcsec=60.0, max_rotation_deg=0.5, n_bright=150,
          match_radius_arcsec=1.0, clip=3.0, n_iter=6, centroid_err_px=None,
          min_matches=10) -> AstrometryResult:
    """Match sources to the refcat starting from ``rough_wcs`` and fit a TAN-SIP WCS.

    x, y, flux : source centroids (0-based px) and fluxes; ``usable`` selects
        point-like, unsaturated, unflagged sources for the fit.
    centroid_err_px : per-source centroid error (px), for the fit weights.
    ref_err_mas : reference position error (mas).
    """
    ny, nx = shape
    x, y, flux = np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float)
    ref_ra, ref_dec = np.asarray(ref_ra, float), np.asarray(ref_dec, float)
    scale_as = np.sqrt(abs(np.linalg.det(rough_wcs.pixel_scale_matrix))) * 3600
    max_off_px = max_offset_arcsec / scale_as
    rx, ry = rough_wcs.all_world2pix(ref_ra, ref_dec, 0)
    margin = max_off_px + 10
    on = (rx > -margin) & (rx < nx + margin) & (ry > -margin) & (ry < ny + margin)
    if on.sum() < min_matches:
        raise AstrometryError(f"only {on.sum()} reference stars fall on the detector with the rough WCS")
    # Brightest of each, restricted to the same magnitude range as far as we know it:
    # sources that are usable (unsaturated) but also saturated ones are fine for voting.
    ref_on = np.nonzero(on)[0]
    ref_b = ref_on[np.argsort(ref_mag[ref_on])[:n_bright]]
    src_b = np.argsort(-flux)[: int(1.5 * n_bright)]
    centre = ((nx - 1) / 2, (ny - 1) / 2)
    pm = pattern_match(x[src_b], y[src_b], rx[ref_b], ry[ref_b], centre, max_off_px, max_rotation_deg)
    log.info("pattern match: shift (%.1f, %.1f) px, rotation %.3f deg, %d votes, significance %.0f",
             pm.dx, pm.dy, pm.rotation_deg, pm.n_votes, pm.significance)

    # Reference pixel positions under the matched shift/rotation: first guess
    gx, gy = _rotate(rx, ry, *centre, pm.rotation_deg)
    gx, gy = gx + pm.dx, gy + pm.dy
    ui = np.nonzero(usable)[0]
    tree = cKDTree(np.column_stack([x[ui], y[ui]]))
    radius_px = max(3.0, 2 * match_radius_arcsec / scale_as)
    wcs = None
    crpix0 = centre
    # tangent point: rough WCS centre moved by the matched shift
    crval = rough_wcs.all_pix2world([[centre[0] - pm.dx, centre[1] - pm.dy]], 0)[0]
    keep_ref = np.nonzero(on)[0]
    if centroid_err_px is None:
        centroid_err_px = np.full(len(x), 0.05)
    rms = np.inf
    si = ri = None
    for it in range(n_iter):
        if wcs is not None:
            gx, gy = wcs.all_world2pix(ref_ra, ref_dec, 0)
        d, j = tree.query(np.column_stack([gx[keep_ref], gy[keep_ref]]), distance_upper_bound=radius_px)
        ok = np.isfinite(d)
        ri, si = keep_ref[ok], ui[j[ok]]
        # one reference star per source: keep the nearest
        order_ = np.argsort(d[ok])
        _, first = np.unique(si[order_], return_index=True)
        ri, si = ri[order_][first], si[order_][first]
        fit_order = _affordable_order(len(si), order)
        if len(si) < min_matches or fit_order == 0:
            raise AstrometryError(f"only {len(si)} sources matched the refcat within {radius_px:.1f} px "
                                  f"(need {min_matches})")
        var_mas2 = (centroid_err_px[si] * scale_as * 1e3) ** 2 + np.asarray(ref_err_mas)[ri] ** 2
        wts = 1.0 / var_mas2
        sel = np.ones(len(si), bool)
        for _ in range(5):  # clip within this match set
            if RADIAL_BELOW and sel.sum() < RADIAL_BELOW and fit_order >= 2:
                # few matches: the camera's radial distortion (3 numbers), not a free cubic
                wcs = fit_tan_radial(x[si[sel]], y[si[sel]], ref_ra[ri[sel]], ref_dec[ri[sel]], crpix0, crval,
                                     weights=wts[sel])
            else:
                wcs = fit_tan_sip(x[si[sel]], y[si[sel]], ref_ra[ri[sel]], ref_dec[ri[sel]], crpix0, crval,
                                  order=fit_order, weights=wts[sel])
            crval = wcs.wcs.crval
            fra, fdec = wcs.all_pix2world(x[si], y[si], 0)
            da, dd = sky_offset_mas(fra, fdec, ref_ra[ri], ref_dec[ri])
            chi = np.hypot(da, dd) / np.sqrt(2 * var_mas2)  # ~ Rayleigh-scaled
            # robust scale of chi (median of a Rayleigh is 1.177 sigma)
            s = np.median(chi[sel]) / 1.1774
            new = chi < clip * max(s, 1e-3)
            if np.array_equal(new, sel):
                break
            sel = new
        rms = float(np.sqrt(np.mean(da[sel] ** 2 + dd[sel] ** 2)))
        si, ri = si[sel], ri[sel]
        # next round: radius from the fit quality (5 sigma, at least 1 px)
        radius_px = max(1.0, 5 * rms / 1e3 / scale_as)
        log.info("astrometry iteration %d: %d matches, order %d, rms %.1f mas", it, len(si), fit_order, rms)
    return AstrometryResult(wcs, si, ri, rms, len(si), pm)
