"""FLUXNET daily loader: both layouts, QC chosen by name, negative GPP dropped; hand-checked answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from stembed.eval.fluxnet import FluxError, load_fluxnet_daily

# TA_F_MDS_QC comes first on purpose: the authors' "first column containing QC" would pick it.
FULLSET = """TIMESTAMP,TA_F_MDS_QC,GPP_NT_VUT_REF,NEE_VUT_REF_QC
20200101,1,2.0,0.9
20200102,1,-0.5,0.95
20200103,1,3.0,0.5
20200104,0,4.0,0.7
20200105,1,-9999,1
20200106,1,5.5,-9999
"""
FLUXDATAKIT = FULLSET.replace("2020010", "2020-01-0").replace("-9999", "NA")


@pytest.mark.parametrize(("text", "layout"), [(FULLSET, "fluxnet2015"), (FLUXDATAKIT, "fluxdatakit")])
def test_both_layouts_give_the_hand_computed_days(tmp_path: Path, text: str, layout: str) -> None:
    path = tmp_path / "FLX_XX-Tst_FLUXNET2015_FULLSET_DD_2020-2020_1-4.csv"
    path.write_text(text)
    df = load_fluxnet_daily(path)
    # kept: 01 (qc .9), 04 (qc exactly .7 although TA_F_MDS_QC is 0); dropped: 02 negative, 03 qc .5,
    # 05 missing GPP, 06 missing QC
    assert [d.day for d in df.index] == [1, 4]
    assert df["gpp"].tolist() == [2.0, 4.0]
    assert df.attrs["layout"] == layout and df.attrs["site"] == "XX-Tst"
    assert (df.attrs["dropped_missing"], df.attrs["dropped_low_qc"], df.attrs["dropped_negative"]) == (1, 2, 1)


def test_negative_gpp_can_be_kept(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text(FULLSET)
    assert load_fluxnet_daily(path, drop_negative=False)["gpp"].tolist() == [2.0, -0.5, 4.0]


def test_bad_files_are_explained(tmp_path: Path) -> None:
    (tmp_path / "hh.csv").write_text("TIMESTAMP_START,GPP_NT_VUT_REF\n202001010000,1\n")
    with pytest.raises(FluxError, match=r"lacks column\(s\) \['TIMESTAMP', 'NEE_VUT_REF_QC'\]"):
        load_fluxnet_daily(tmp_path / "hh.csv")
    (tmp_path / "ts.csv").write_text("TIMESTAMP,GPP_NT_VUT_REF,NEE_VUT_REF_QC\n01/02/2020,1,1\n")
    with pytest.raises(FluxError, match="neither YYYYMMDD"):
        load_fluxnet_daily(tmp_path / "ts.csv")
    (tmp_path / "pct.csv").write_text("TIMESTAMP,GPP_NT_VUT_REF,NEE_VUT_REF_QC\n20200101,1,80\n")
    with pytest.raises(FluxError, match="exceeds 1"):
        load_fluxnet_daily(tmp_path / "pct.csv")
    with pytest.raises(FluxError, match="does not exist"):
        load_fluxnet_daily(tmp_path / "none.csv")


def test_real_de_hai_counts_match_its_provenance(shared_data_root: Path) -> None:
    df = load_fluxnet_daily(shared_data_root / "fluxnet_daily_gpp" / "FLX_DE-Hai_FLUXDATAKIT_FULLSET_DD_2000_2020_2-3.csv")
    assert df.attrs["layout"] == "fluxdatakit" and df.attrs["site"] == "DE-Hai"
    per_year = df.loc["2017":"2020"].groupby(df.loc["2017":"2020"].index.year).size().to_dict()
    assert per_year == {2017: 274, 2018: 264, 2019: 264, 2020: 275}  # PROVENANCE.md: 1077 of 1461 days pass
