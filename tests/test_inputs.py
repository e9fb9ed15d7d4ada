"""diapipe.inputs: the user's exposures table, filled from FITS headers, validated row by row.

Small FITS files with chosen header cards stand in for raw frames: the values
read back are compared with the cards written, and every bad table must give
one ExposureTableError naming the table, the line and the column.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from diapipe import cli, inputs
from diapipe.inputs import ExposureTableError, read_exposure_table

HEADER = "path\tvisit\tdetector\tband\ttype\n"


def _fits(path, **cards):
    """A 4x4 uint16 frame with the given header cards (keyword=value; None leaves it out)."""
    h = fits.Header()
    for k, v in cards.items():
        if v is not None:
            h[k.replace("_", "-")] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(np.zeros((4, 4), np.uint16), header=h).writeto(path, overwrite=True)
    return path


@pytest.fixture
def night(tmp_path, monkeypatch):
    """One detector, two visits in r, with 2 biases, 1 dark and 2 r flats; cwd = tmp_path."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "raw"
    files = {
        "v10": _fits(d / "v10.fits", EXPNUM=10, DETECTOR=3, FILTER="r", OBSTYPE="object", MJD_OBS=60100.25,
                     EXPTIME=60.0),
        # A camera with other keywords: CCDNUM, IMAGETYP, DATE-OBS, EXPOSURE.
        "v11": _fits(d / "v11.fits", EXPNUM=11, CCDNUM=3, FILTER="r", IMAGETYP="Light Frame",
                     DATE_OBS="2023-06-19T12:00:00", EXPOSURE=90.0),
        "b0": _fits(d / "b0.fits", DETECTOR=3, IMAGETYP="zero", EXPTIME=0.0, FILTER="r", EXPNUM=-1),
        "b1": _fits(d / "b1.fits", DETECTOR=3, OBSTYPE="bias", EXPTIME=0.0),
        "dk": _fits(d / "dk.fits", DETECTOR=3, OBSTYPE="dark", EXPTIME=300.0),
        "f0": _fits(d / "f0.fits", DETECTOR=3, OBSTYPE="twilight flat", FILTER="r", EXPTIME=5.0),
        "f1": _fits(d / "f1.fits", DETECTOR=3, OBSTYPE="domeflat", FILTER="r", EXPTIME=4.0),
    }
    return {k: str(p.relative_to(tmp_path)) for k, p in files.items()}


def _table(tmp_path, text, name="exposures.tsv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _all_blank(files, order=("v10", "v11", "b0", "b1", "dk", "f0", "f1")):
    return HEADER + "".join(f"{files[k]}\t\t\t\t\n" for k in order)


def test_blank_cells_are_read_from_the_headers(night, tmp_path):
    df = read_exposure_table(_table(tmp_path, _all_blank(night)))
    by = df.set_index("path")
    v10, v11 = by.loc[night["v10"]], by.loc[night["v11"]]
    assert (v10.visit, v10.detector, v10.band, v10.type) == (10, 3, "r", "object")
    assert v10.mjd == pytest.approx(60100.25, abs=1e-9) and v10.exptime == 60.0
    # CCDNUM, IMAGETYP 'Light Frame', DATE-OBS (-> MJD) and EXPOSURE stand in for the usual cards.
    assert (v11.visit, v11.detector, v11.type, v11.exptime) == (11, 3, "object", 90.0)
    assert v11.mjd == pytest.approx(60114.5, abs=1e-9)  # 2023-06-19T12:00 UTC
    assert by.loc[night["b0"], "type"] == "bias"  # IMAGETYP 'zero'
    assert by.loc[night["f0"], "type"] == "flat" and by.loc[night["f1"], "type"] == "flat"
    # Calibration frames carry no visit, biases and darks no band (whatever EXPNUM/FILTER say).
    assert by.loc[night["b0"], "visit"] == -1 and by.loc[night["b0"], "band"] == ""
    assert list(df["line"]) == list(range(2, 9))
    assert (df["npix"] == 16).all()  # 4 x 4 frames: job memory is sized from it


def test_lookups_follow_table_order(night, tmp_path):
    df = read_exposure_table(_table(tmp_path, _all_blank(night, ("f1", "v11", "b1", "v10", "dk", "b0", "f0"))))
    assert inputs.data_ids(df) == [(10, 3), (11, 3)]
    assert inputs.visits(df) == [10, 11] and inputs.detectors(df) == [3] and inputs.bands(df) == ["r"]
    assert inputs.raw_path(df, 11, 3) == night["v11"]
    # seq counts within (type, detector, band) in table order: it is the {seq} of raw_bias etc.
    assert inputs.calib_paths(df, "bias", 3) == [night["b1"], night["b0"]]
    assert inputs.calib_paths(df, "flat", 3, "r") == [night["f1"], night["f0"]]
    assert inputs.lookup(df, "raw_flat", detector=3, band="r", seq=1) == night["f0"]
    assert inputs.lookup(df, "raw", visit=10, detector=3) == night["v10"]
    with pytest.raises(KeyError, match="no object frame visit=12"):
        inputs.lookup(df, "raw", visit=12, detector=3)
    # No template flag set: every visit may go into a template.
    assert inputs.template_pool(df) == [10, 11]
    assert inputs.visit_mjds(df)[10] == pytest.approx(60100.25)


def test_table_values_fill_gaps_and_template_flags(night, tmp_path):
    # v10 without FILTER and EXPTIME in its header: the table gives them.
    _fits(tmp_path / night["v10"], EXPNUM=10, DETECTOR=3, OBSTYPE="object", MJD_OBS=60100.25)
    text = ("path\tband\texptime\ttemplate\n"
            f"{night['v10']}\tr\t60\tyes\n{night['v11']}\t\t\tno\n"
            + "".join(f"{night[k]}\t\t\t\n" for k in ("b0", "b1", "dk", "f0", "f1")))
    df = read_exposure_table(_table(tmp_path, text))
    row = df[df["visit"] == 10].iloc[0]
    assert (row.band, row.exptime, bool(row.template)) == ("r", 60.0, True)
    assert inputs.template_pool(df) == [10]


def _error(tmp_path, text) -> str:
    with pytest.raises(ExposureTableError) as info:
        read_exposure_table(_table(tmp_path, text))
    return str(info.value)


def test_missing_table_file(tmp_path):
    with pytest.raises(ExposureTableError, match=r"cannot read the exposures table.*file: .*nope\.tsv"):
        read_exposure_table(tmp_path / "nope.tsv")


def test_missing_raw_file_names_line_and_path(night, tmp_path):
    msg = _error(tmp_path, _all_blank(night) + "raw/gone.fits\t12\t3\tr\tobject\n")
    assert "exposures.tsv line 9 (raw/gone.fits), column 'path': no such file" in msg


def test_unknown_type(night, tmp_path):
    msg = _error(tmp_path, _all_blank(night).replace(f"{night['dk']}\t\t\t\t", f"{night['dk']}\t\t\t\tsky"))
    assert f"line 6 ({night['dk']}), column 'type'" in msg and "'sky' is not one of" in msg
    # The same from a header card names the card.
    _fits(tmp_path / night["dk"], DETECTOR=3, OBSTYPE="focus", EXPTIME=3.0)
    msg = _error(tmp_path, _all_blank(night))
    assert "line 6" in msg and "column 'type'" in msg and "from header OBSTYPE" in msg


def test_duplicate_data_id_names_both_lines(night, tmp_path):
    dup = _fits(tmp_path / "raw" / "v10b.fits", EXPNUM=10, DETECTOR=3, FILTER="r", OBSTYPE="object",
                MJD_OBS=60100.26, EXPTIME=60.0)
    msg = _error(tmp_path, _all_blank(night) + f"{dup.relative_to(tmp_path)}\t\t\t\t\n")
    assert "lines [2, 9]: duplicate dataId visit=10, detector=3" in msg
    assert "lines [2, 9]: the same file" in _error(tmp_path, _all_blank(night) + f"{night['v10']}\t\t\t\t\n")


def test_missing_column_without_header_fallback(night, tmp_path):
    _fits(tmp_path / night["v11"], EXPNUM=11, DETECTOR=3, OBSTYPE="object", MJD_OBS=60101.0, EXPTIME=60.0)
    # No band column at all, and v11 has no FILTER card.
    text = "path\n" + "".join(f"{night[k]}\n" for k in ("v10", "v11", "b0", "b1", "dk", "f0", "f1"))
    msg = _error(tmp_path, text)
    assert f"line 3 ({night['v11']}), column 'band'" in msg
    assert "object frame needs it: no value in the table and no FILTER card in the header" in msg


def test_table_and_header_must_agree(night, tmp_path):
    msg = _error(tmp_path, _all_blank(night).replace(f"{night['v10']}\t\t", f"{night['v10']}\t12\t"))
    assert f"line 2 ({night['v10']}), column 'visit': the table says 12 but the header says EXPNUM=10" in msg


def test_bad_cells_and_columns(night, tmp_path):
    msg = _error(tmp_path, _all_blank(night).replace(f"{night['v10']}\t\t", f"{night['v10']}\tten\t"))
    assert "line 2" in msg and "column 'visit': 'ten' is not an integer" in msg
    msg = _error(tmp_path, "path\tfilter\n" + f"{night['v10']}\tr\n")
    assert "line 1: unknown column(s) ['filter']" in msg


def test_calibrations_required_for_object_detectors(night, tmp_path):
    msg = _error(tmp_path, _all_blank(night, ("v10", "v11", "b0", "b1", "f0", "f1")))
    assert "detector 3 has object frames but 0 dark frame(s) to calibrate them, 1 needed" in msg
    msg = _error(tmp_path, _all_blank(night, ("v10", "v11", "b0", "b1", "dk")))
    assert "0 r flat(s), 1 needed" in msg
    df = read_exposure_table(_table(tmp_path, _all_blank(night)))
    with pytest.raises(ExposureTableError, match=r"1 dark frame\(s\) to calibrate them, 2 needed"):
        inputs.check_calibrations(df, "t.tsv", min_frames=2)


def test_cli_prints_the_resolved_table(night, tmp_path, capsys):
    table = _table(tmp_path, _all_blank(night))
    assert cli.main(["inputs", str(table)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split("\t") == inputs.COLUMNS[:-1]
    row = dict(zip(lines[0].split("\t"), lines[1].split("\t")))
    assert (row["visit"], row["detector"], row["band"], row["type"], float(row["mjd"])) == ("10", "3", "r", "object",
                                                                                            60100.25)
    assert "7 frames" in err and "template pool [10, 11]" in err
    bad = _table(tmp_path, HEADER + "nope.fits\t1\t0\tr\tobject\n", "bad.tsv")
    assert cli.main(["inputs", str(bad)]) == 1
    assert "bad.tsv line 2 (nope.fits), column 'path': no such file" in capsys.readouterr().err
