"""Synthetic cutout triplets of real and bogus difference-image detections.

A stand-in for the simulated survey's diaSources when training and testing
the real/bogus machinery, and a way to give the classifier bogus of every kind
real data has.  Each stamp is rendered on a larger canvas (science with its
PSF, template with a sharper PSF and its own noise, difference = science -
template matched to the science PSF), "detected" at the peak of the
PSF-filtered difference within a few pixels of the canvas centre (required
|S/N| >= 5, as the detection stage would), and cut out around that peak.

Kinds (label 1 = real, 0 = bogus):

real        PSF point source in the science only (hostless, in a galaxy, a
            variable star, or near a detector edge); 15% fade (negative).
dipole      bright star misregistered by 0.02-0.25 FWHM between the epochs.
saturated   saturated star: clipped core, bleed column, mismatched wings.
cosmic_ray  sharp hit or short track in the science only (narrower than the PSF).
bad_column  a column (or segment) offset in the science only.
trail       satellite trail: a PSF-wide line across the stamp.
psf_ring    star or galaxy core subtracted with a PSF of the wrong width.
edge        stamp at a detector/coadd edge: no-data region and a residual ramp.

Images are in electrons, sky-subtracted or not (a random pedestal is added to
half of the stamps); lengths in pixels; fluxes in electrons.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from . import masks
from .seeds import rng_for

BOGUS_KINDS = ("dipole", "saturated", "cosmic_ray", "bad_column", "trail", "psf_ring", "edge")
KINDS = ("real",) + BOGUS_KINDS
_SIG2FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))
_BETA = 3.0  # Moffat index of the simulated PSFs


def moffat(xx, yy, x0, y0, fwhm, e1=0.0, e2=0.0, beta=_BETA):
    """Unit-flux elliptical Moffat profile sampled at pixel centres."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    dx, dy = xx - x0, yy - y0
    # shear the coordinates: ellipticity (e1, e2) with unit determinant
    u = (1 - e1) * dx - e2 * dy
    v = -e2 * dx + (1 + e1) * dy
    r2 = (u * u + v * v) / (1 - e1 * e1 - e2 * e2)
    return (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** (-beta)


def gauss2d(xx, yy, x0, y0, sigma_major, q, theta):
    """Unit-flux elliptical Gaussian (axis ratio q, position angle theta)."""
    dx, dy = xx - x0, yy - y0
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    sa, sb = sigma_major, sigma_major * q
    return np.exp(-0.5 * (u * u / sa**2 + v * v / sb**2)) / (2 * np.pi * sa * sb)


def _visit_conditions(rng) -> dict:
    fwhm = rng.uniform(1.8, 5.0)
    return dict(
        fwhm=fwhm,
        template_fwhm=fwhm * rng.uniform(0.6, 0.98),
        e1=rng.normal(0, 0.03),
        e2=rng.normal(0, 0.03),
        sky=float(np.exp(rng.uniform(np.log(100.0), np.log(5000.0)))),
        template_depth=rng.uniform(2.0, 5.0),  # template noise = science noise / depth
        saturation=rng.uniform(3e4, 1e5),
        has_mask=rng.random() < 0.7,
        has_variance=rng.random() < 0.7,
        pedestal=rng.random() < 0.5,
    )


def _render_scene(rng, xx, yy, cond, cx, cy):
    """Static sources (identical in both epochs): field stars and galaxies. Returns list of dicts."""
    sig_s = np.sqrt(cond["sky"])
    out = []
    for _ in range(rng.poisson(1.0)):
        f = sig_s * np.exp(rng.uniform(np.log(10), np.log(300))) * cond["fwhm"]
        out.append(dict(kind="star", x=rng.uniform(0, xx.shape[1]), y=rng.uniform(0, xx.shape[0]), flux=f))
    for _ in range(rng.poisson(0.5)):
        f = sig_s * np.exp(rng.uniform(np.log(20), np.log(500))) * cond["fwhm"]
        out.append(
            dict(kind="gal", x=rng.uniform(0, xx.shape[1]), y=rng.uniform(0, xx.shape[0]), flux=f,
                 r=rng.uniform(0.5, 2.5) * cond["fwhm"], q=rng.uniform(0.3, 1), th=rng.uniform(0, np.pi))
        )
    return out


def _draw(src, xx, yy, fwhm, e1, e2, shift=(0.0, 0.0)):
    x, y = src["x"] + shift[0], src["y"] + shift[1]
    if src["kind"] == "star":
        return src["flux"] * moffat(xx, yy, x, y, fwhm, e1, e2)
    sp = fwhm / _SIG2FWHM
    # galaxy (Gaussian) convolved with a Gaussian-equivalent PSF: widths add in quadrature
    sa = np.sqrt(src["r"] ** 2 + sp**2)
    sb = np.sqrt((src["r"] * src["q"]) ** 2 + sp**2)
    return src["flux"] * gauss2d(xx, yy, x, y, sa, sb / sa, src["th"])


def make_triplet(rng, cond, kind, size=41, pad=8):
    """Render one detection of ``kind``; returns a dict of cutouts and truth, or None if undetected."""
    B = size + 2 * pad
    yy, xx = np.mgrid[:B, :B].astype(float)
    cx = cy = (B - 1) / 2.0
    fw, tfw = cond["fwhm"], cond["template_fwhm"]
    e1, e2 = cond["e1"], cond["e2"]
    sig_s = np.sqrt(cond["sky"])
    sig_t = sig_s / cond["template_depth"]
    sp = fw / _SIG2FWHM
    sat = cond["saturation"]
    # static scene (perfectly subtracted unless the kind says otherwise)
    scene = _render_scene(rng, xx, yy, cond, cx, cy)
    sci = np.zeros((B, B))
    ref = np.zeros((B, B))
    match_fw = fw  # PSF of the template after matching to the science
    extra_sci = np.zeros((B, B))  # science-only signal (transient, artefact)
    extra_diff = np.zeros((B, B))  # difference-only residual (ramps)
    msk = np.zeros((B, B), dtype=masks.MASK_DTYPE)
    nodata = np.zeros((B, B), bool)
    ox, oy = rng.uniform(-1.5, 1.5, 2)  # source position relative to the canvas centre
    x0, y0 = cx + ox, cy + oy
    shift = (0.0, 0.0)
    true_flux = 0.0
    sub = ""
    star_flux = lambda lo, hi: sig_s * fw * np.exp(rng.uniform(np.log(lo), np.log(hi)))  # noqa: E731

    if kind == "real":
        snr = np.exp(rng.uniform(np.log(4.0), np.log(300.0)))
        true_flux = snr * sig_s * np.sqrt(4 * np.pi) * sp  # PSF-optimal S/N on sky noise
        sub = rng.choice(["hostless", "host", "variable", "edge"], p=[0.4, 0.4, 0.1, 0.1])
        if sub == "host":
            r = rng.uniform(0.5, 3.0) * fw
            off = rng.uniform(0, 1.5) * r
            a = rng.uniform(0, 2 * np.pi)
            scene.append(dict(kind="gal", x=x0 + off * np.cos(a), y=y0 + off * np.sin(a),
                              flux=star_flux(20, 2000), r=r, q=rng.uniform(0.3, 1), th=rng.uniform(0, np.pi)))
        elif sub == "variable":
            scene.append(dict(kind="star", x=x0, y=y0, flux=star_flux(10, 1000)))
        elif sub == "edge":
            _edge(rng, xx, yy, x0, y0, fw, nodata, gap=(1.5, 4.0))
        src = dict(kind="star", x=x0, y=y0, flux=true_flux)
        if rng.random() < 0.15:  # fading: the transient is in the template
            ref += _draw(src, xx, yy, tfw, 0, 0)
            extra_sci -= _draw(src, xx, yy, fw, e1, e2)  # matched template carries it: negative difference
        else:
            extra_sci += _draw(src, xx, yy, fw, e1, e2)
    elif kind == "dipole":
        scene.append(dict(kind="star", x=x0, y=y0, flux=star_flux(100, 5000)))
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.02, 0.25) * fw
        shift = (d * np.cos(a), d * np.sin(a))
    elif kind == "saturated":
        f = sat * 2 * np.pi * sp**2 * np.exp(rng.uniform(np.log(1.5), np.log(50)))
        scene.append(dict(kind="star", x=x0, y=y0, flux=f))
        match_fw = fw * rng.uniform(0.9, 1.1)
    elif kind == "cosmic_ray":
        amp = sig_s * np.exp(rng.uniform(np.log(8), np.log(300)))
        if rng.random() < 0.5:  # hit of 1-4 pixels
            for _ in range(rng.integers(1, 5)):
                jx, jy = int(round(x0)) + rng.integers(-1, 2), int(round(y0)) + rng.integers(-1, 2)
                extra_sci[jy, jx] += amp * rng.uniform(0.3, 1.0)
        else:  # short track ("worm"), sub-PSF width
            L = rng.uniform(3, 12)
            a = rng.uniform(0, np.pi)
            for t in np.linspace(-L / 2, L / 2, int(4 * L)):
                jx, jy = int(round(x0 + t * np.cos(a))), int(round(y0 + t * np.sin(a)))
                if 0 <= jx < B and 0 <= jy < B:
                    extra_sci[jy, jx] += amp / 4
        if cond["has_mask"] and rng.random() < 0.5:  # partially caught by the CR finder
            hit = extra_sci > 3 * sig_s
            masks.set_plane(msk, hit & (rng.random((B, B)) < 0.5), "CR")
    elif kind == "bad_column":
        jx = int(round(x0))
        level = sig_s * np.exp(rng.uniform(np.log(1.0), np.log(30)))
        y1, y2 = (0, B) if rng.random() < 0.6 else sorted(rng.integers(0, B, 2))
        y1, y2 = min(y1, int(y0) - 2), max(y2, int(y0) + 3)
        width = 1 if rng.random() < 0.8 else 2
        extra_sci[y1:y2, jx : jx + width] += level
        if cond["has_mask"] and rng.random() < 0.5:
            masks.set_plane(msk, extra_sci > 0, "BAD")
    elif kind == "trail":
        a = rng.uniform(0, np.pi)
        lam = sig_s * np.exp(rng.uniform(np.log(1.5), np.log(40))) * np.sqrt(fw)  # flux per pixel of length
        perp = -np.sin(a) * (xx - x0) + np.cos(a) * (yy - y0)
        extra_sci += lam * np.exp(-0.5 * perp**2 / sp**2) / (np.sqrt(2 * np.pi) * sp)
    elif kind == "psf_ring":
        if rng.random() < 0.7:
            scene.append(dict(kind="star", x=x0, y=y0, flux=star_flux(100, 10000)))
        else:
            scene.append(dict(kind="gal", x=x0, y=y0, flux=star_flux(500, 20000), r=rng.uniform(0.2, 0.8) * fw,
                              q=rng.uniform(0.5, 1), th=rng.uniform(0, np.pi)))
        match_fw = fw * (1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.25))
    elif kind == "edge":
        _edge(rng, xx, yy, x0, y0, fw, nodata, gap=(0.3, 2.0))
        # ramp of interpolation/coverage residual along the edge, decaying away from it
        dist = ndimage.distance_transform_edt(~nodata)
        amp = sig_s * np.exp(rng.uniform(np.log(3), np.log(50)))
        wav = 1 + 0.5 * np.sin(rng.uniform(0.1, 0.5) * (xx + yy) + rng.uniform(0, 6))
        extra_diff += rng.choice([-1, 1], p=[0.2, 0.8]) * amp * np.exp(-dist / (0.7 * fw)) * wav
        if rng.random() < 0.5:  # template coverage drops: noisier next to the edge
            extra_diff += rng.normal(0, 1, (B, B)) * sig_s * 2 * np.exp(-dist / fw)
    else:
        raise ValueError(f"unknown kind {kind!r}")

    # render: science (sky noise + Poisson), template (own PSF, deeper), matched template
    static_sci = sum((_draw(s, xx, yy, fw, e1, e2, shift) for s in scene), np.zeros((B, B)))
    static_ref = sum((_draw(s, xx, yy, tfw, 0, 0) for s in scene), np.zeros((B, B)))
    static_match = sum((_draw(s, xx, yy, match_fw, e1, e2) for s in scene), np.zeros((B, B)))
    model_sci = static_sci + extra_sci
    noise_s = rng.normal(0, 1, (B, B)) * np.sqrt(sig_s**2 + np.clip(model_sci, 0, None))
    sci = model_sci + noise_s
    ref = ref + static_ref
    noise_t = rng.normal(0, 1, (B, B)) * np.sqrt(sig_t**2 + np.clip(ref, 0, None) / cond["template_depth"] ** 2)
    ref = ref + noise_t
    sk = np.sqrt(max(sp**2 - (tfw / _SIG2FWHM) ** 2, 0.01))
    matched = static_match + ndimage.gaussian_filter(noise_t, sk)
    if kind == "real" and np.any(extra_sci < 0):  # fading transient lives in the (matched) template
        matched = matched - extra_sci
        sci = sci - extra_sci
    if kind == "saturated":  # clip both epochs; bleed along the column in the science
        over = sci > sat
        excess = np.clip(sci - sat, 0, None).sum(axis=0)
        sci = np.minimum(sci, sat)
        for jx in np.nonzero(excess > 0)[0]:
            npix = int(min(B, excess[jx] / sat))
            yc = int(round(y0))
            lo, hi = max(0, yc - npix // 2), min(B, yc + npix // 2 + 1)
            over[lo:hi, jx] |= True
            sci[lo:hi, jx] = sat
        matched = np.minimum(matched, sat * rng.uniform(0.8, 1.0))
        ref = np.minimum(ref, sat * 2)
        if cond["has_mask"]:
            masks.set_plane(msk, over, "SAT")
    diff = sci - matched + extra_diff
    var = np.full((B, B), sig_s**2 + (sig_t**2) * 0.5) + np.clip(model_sci, 0, None)

    # detection: peak of the PSF-filtered difference near the canvas centre
    filt = ndimage.gaussian_filter(diff, sp)
    noise_filt = np.sqrt(sig_s**2 + 0.3 * sig_t**2) / (np.sqrt(4 * np.pi) * sp)
    R = np.hypot(xx - cx, yy - cy)
    score = np.where(R <= min(pad, max(2.0, 1.5 * fw)), np.abs(filt), -1)
    k = int(np.argmax(score))
    py, px = divmod(k, B)
    det_snr = filt[py, px] / noise_filt
    if abs(det_snr) < 5:
        return None
    h = size // 2
    cut = (slice(py - h, py + h + 1), slice(px - h, px + h + 1))
    if cond["pedestal"]:
        sci = sci + cond["sky"]
        ref = ref + cond["sky"] * rng.uniform(0.5, 2.0)
    if nodata.any():
        sci, ref, diff = (np.where(nodata, np.nan, a) for a in (sci, ref, diff))
        masks.set_plane(msk, nodata, "NO_DATA")
        masks.set_plane(msk, ndimage.binary_dilation(nodata, iterations=2) & ~nodata, "EDGE")
    # nearest reference-catalog star (template S/N > 20) in pixels, as the diaSource refDistance
    stars = [s for s in scene if s["kind"] == "star" and s["flux"] > 20 * sig_t * np.sqrt(4 * np.pi) * sp]
    if stars:
        refd = min(np.hypot(s["x"] - px, s["y"] - py) for s in stars)
    else:
        refd = rng.uniform(B / 2, 300.0)
    return dict(
        science=sci[cut].astype(np.float32),
        template=ref[cut].astype(np.float32),
        difference=diff[cut].astype(np.float32),
        variance=var[cut].astype(np.float32),
        mask=msk[cut],
        kind=kind,
        subkind=str(sub),
        label=int(kind == "real"),
        det_snr=float(det_snr),
        true_flux=float(true_flux),
        ref_distance=float(refd),
    )


def _edge(rng, xx, yy, x0, y0, fw, nodata, gap):
    """Mark as no-data the half-plane beyond a straight edge ``gap`` FWHM from (x0, y0)."""
    a = rng.choice([0, np.pi / 2, np.pi, 3 * np.pi / 2]) + rng.normal(0, 0.05)
    g = rng.uniform(*gap) * fw
    nodata |= (np.cos(a) * (xx - x0) + np.sin(a) * (yy - y0)) > g


def make_synthetic(n_visits=40, per_visit=500, seed=0, real_fraction=0.45, size=41, first_visit=0):
    """Synthetic detections for ``n_visits`` visits of ``per_visit`` each.

    Returns (cutouts, table): cutouts is a dict of (N, size, size) arrays
    (science, template, difference, variance, mask); table has one row per
    detection with visit, kind, subkind, label, det_snr (S/N of the detection),
    true_flux, fwhm, template_fwhm, ref_distance, has_mask, has_variance.
    """
    stacks = {k: [] for k in ("science", "template", "difference", "variance", "mask")}
    rows = []
    for visit in range(first_visit, first_visit + n_visits):
        rng = rng_for(seed, "realbogus_synth", visit=visit)
        cond = _visit_conditions(rng)
        n_real = int(round(per_visit * real_fraction))
        kinds = ["real"] * n_real + [BOGUS_KINDS[i % len(BOGUS_KINDS)] for i in range(per_visit - n_real)]
        for kind in kinds:
            for _attempt in range(20):
                t = make_triplet(rng, cond, kind, size=size)
                if t is not None:
                    break
            else:
                continue
            for k in stacks:
                stacks[k].append(t.pop(k))
            rows.append(dict(visit=visit, fwhm=cond["fwhm"], template_fwhm=cond["template_fwhm"],
                             has_mask=cond["has_mask"], has_variance=cond["has_variance"], **t))
    cutouts = {k: np.stack(v) for k, v in stacks.items()}
    table = pd.DataFrame(rows)
    table.insert(0, "diaSourceId", np.arange(len(table), dtype=np.int64))
    return cutouts, table


def synthetic_features(cutouts, table) -> pd.DataFrame:
    """Features of synthetic detections, honouring each visit's has_mask / has_variance."""
    from .realbogus import FEATURE_NAMES, compute_features

    out = pd.DataFrame(index=table.index, columns=FEATURE_NAMES, dtype=float)
    for (hm, hv), grp in table.groupby(["has_mask", "has_variance"]):
        i = grp.index.to_numpy()
        f = compute_features(
            cutouts["science"][i], cutouts["template"][i], cutouts["difference"][i], grp["fwhm"].to_numpy(),
            variance=cutouts["variance"][i] if hv else None, mask=cutouts["mask"][i] if hm else None,
            template_fwhm=grp["template_fwhm"].to_numpy(), ref_distance=grp["ref_distance"].to_numpy(),
        )
        out.loc[i] = f.to_numpy()
    return out
