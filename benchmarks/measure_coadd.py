"""Print the warp/coadd acceptance numbers measured on the synthetic survey of tests/test_coadd.py.

    .venv/bin/python benchmarks/measure_coadd.py

Same data as the tests (tests/warp_synth.py: 6 visits, 300 stars, single-visit
cosmic rays / trail / mover / transient, bad columns, TAN-SIP WCS, Moffat PSF
varying across the detector, seeing 3.3-4.3 px), the numbers instead of pass/fail.
"""

import sys
from pathlib import Path

import numpy as np
import sep

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from diapipe import masks  # noqa: E402
from diapipe.coadd import assemble_coadd, find_artefacts  # noqa: E402
from diapipe.warp import mean_noise_correlation, photometric_scale, warp_to_patch  # noqa: E402
from warp_synth import make_survey, small_skymap, weighted_fwhm  # noqa: E402


def iso(x, y, r):
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1) > r


def main():
    s = make_survey(n_visits=6, clean_too=True, n_stars=300)
    sm = small_skymap()
    stars = s["stars"]
    W = {p: [warp_to_patch([cx], sm, p) for cx, _ in s["visits"]] for p in range(4)}
    Wc = {p: [warp_to_patch([cx], sm, p) for cx in s["clean"]] for p in range(4)}
    # warp vs calexp aperture flux, and warp centroids vs truth
    ratios, xs, cen = [], [], []
    for p in range(4):
        for (cx, tr), w in zip(s["visits"], W[p]):
            sc = photometric_scale(cx.metadata["MAGZERO"])
            x, y = w.wcs.all_world2pix(stars["ra"], stars["dec"], 0)
            sel = (x > 30) & (x < 210) & (y > 30) & (y < 210) & iso(tr["x"], tr["y"], 14)
            fc, _, a = sep.sum_circle(cx.image.astype(float), tr["x"][sel], tr["y"][sel], 12.0,
                                      mask=masks.is_set(cx.mask, *masks.BAD_PLANES))
            fw, _, b = sep.sum_circle(w.image.astype(float), x[sel], y[sel], 12.6,
                                      mask=masks.is_set(w.mask, *masks.BAD_PLANES))
            ok = (a == 0) & (b == 0)
            ratios += list(fw[ok] / (fc[ok] * sc))
            xs += list(x[sel][ok])
            b2 = sel & (stars["flux_njy"] > 1e6) & iso(tr["x"], tr["y"], 15)
            xw, yw, f = sep.winpos(w.image.astype(float), x[b2], y[b2], np.full(b2.sum(), 1.6),
                                   mask=masks.is_set(w.mask, *masks.BAD_PLANES))
            cen += list(np.hypot(xw - x[b2], yw - y[b2])[f == 0])
    ratios, xs, cen = np.array(ratios), np.array(xs), np.array(cen)
    slope = np.polyfit((xs - 120) / 240, ratios, 1)[0]
    print(f"warp/calexp aperture flux: median ratio {np.median(ratios):.5f} (n={len(ratios)}), "
          f"slope across the patch {slope * 100:+.3f}% per patch width")
    print(f"warp centroids vs truth: rms {np.sqrt(np.mean(cen**2) / 2) * 200:.2f} mas per axis (n={len(cen)})")
    # coadds
    leak, raw, psfr, ccen, zpix = 0.0, 0.0, [], [], []
    for p in range(4):
        rej = find_artefacts(W[p])
        co = assemble_coadd(W[p], rejected=rej)
        cc = assemble_coadd(Wc[p], rejected=rej)
        nvis = sum((~masks.is_set(w.mask, "NO_DATA")).astype(int) for w in W[p])
        ok = (co.mask == 0) & (co.variance > 0) & (nvis >= 2)
        leak = max(leak, float((np.abs(co.image - cc.image)[ok] / np.sqrt(co.variance[ok])).max()))
        r0, r1 = assemble_coadd(W[p], reject=False), assemble_coadd(Wc[p], reject=False)
        raw = max(raw, float((np.abs(r0.image - r1.image)[ok] / np.sqrt(r0.variance[ok])).max()))
        nim = next(h.data for h in co.extra_hdus if h.name == "NIMAGE")
        x, y = co.wcs.all_world2pix(stars["ra"], stars["dec"], 0)
        sel = (x > 15) & (x < 225) & (y > 15) & (y < 225) & (stars["flux_njy"] > 5e5) & iso(x, y, 20)
        for xi, yi in zip(x[sel], y[sel]):
            ix, iy = int(round(xi)), int(round(yi))
            if co.mask[iy - 10:iy + 11, ix - 10:ix + 11].any() or np.ptp(nim[iy - 6:iy + 7, ix - 6:ix + 7]) > 0:
                continue
            st = co.psf.image(xi, yi)
            c = (st.shape[0] - 1) / 2
            psfr.append(weighted_fwhm(co.image, xi, yi) / weighted_fwhm(st, c, c))
        b2 = (x > 15) & (x < 225) & (y > 15) & (y < 225) & (stars["flux_njy"] > 1e6) & iso(x, y, 15)
        xw, yw, f = sep.winpos(co.image.astype(float), x[b2], y[b2], np.full(b2.sum(), 1.6),
                               mask=masks.is_set(co.mask, *masks.BAD_PLANES))
        ccen += list(np.hypot(xw - x[b2], yw - y[b2])[f == 0])
    psfr, ccen = np.array(psfr), np.array(ccen)
    print(f"coadd artefact leak (cr, trail, mover, transient; >= 2 visits): max {leak:.2f} sigma "
          f"(without rejection: {raw:.1f} sigma)")
    print(f"coadd PSF FWHM / coadded-star FWHM: max |1 - ratio| {np.max(np.abs(psfr - 1)) * 100:.2f}% "
          f"(median {np.median(np.abs(psfr - 1)) * 100:.2f}%, n={len(psfr)} stars with exact PSF)")
    print(f"coadd centroids vs truth: rms {np.sqrt(np.mean(ccen**2) / 2) * 200:.2f} mas per axis (n={len(ccen)})")
    # blank sky
    b = make_survey(n_visits=4, artefacts=(), n_stars=0)
    zs, bs, bv, nc = [], [], [], []
    for p in range(4):
        co = assemble_coadd([warp_to_patch([cx], sm, p) for cx, _ in b["visits"]])
        ok = (co.mask == 0) & (co.variance > 0)
        zs.append(co.image[ok] / np.sqrt(co.variance[ok]))
        img, var = np.where(ok, co.image, np.nan), np.where(ok, co.variance, np.nan)
        n = co.shape[0] // 8 * 8
        bb = img[:n, :n].reshape(n // 8, 8, n // 8, 8).sum(axis=(1, 3))
        vv = var[:n, :n].reshape(n // 8, 8, n // 8, 8).sum(axis=(1, 3))
        g = np.isfinite(bb)
        bs += list(bb[g])
        bv += list(vv[g])
        nc.append(co.metadata["NOISECOR"])
    z = np.concatenate(zs)
    bs, bv = np.array(bs), np.array(bv)
    print(f"blank-sky coadd: pixel std / sqrt(variance plane) = {np.std(z):.4f}; 8x8-box sums: "
          f"var / (sum var x NOISECOR={np.mean(nc):.3f}) = {np.var(bs) / np.mean(bv * np.mean(nc)):.4f} "
          f"(without NOISECOR {np.var(bs) / np.mean(bv):.3f}; Lanczos-3 alone {mean_noise_correlation():.3f})")


if __name__ == "__main__":
    main()
