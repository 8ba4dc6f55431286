"""Prompts rule (issue 11): a strict schema for prompt files; ``ras``/``lps`` keys mean what
they say; every refusal names the offending entry and exits 2 before anything is read.

Every case here misbehaved on main @ 2b0bdb6 (reviews/newcomer.md M3, m9, p7, p9;
reviews/reliability.md #15, #25)."""

from __future__ import annotations

import json

import pytest
from inputs_stubs import blob_volume, listing, no_model  # noqa: F401

from fastsam3d.cli import main
from fastsam3d.commands import segment


def _read(tmp_path, data, raw=None):
    path = tmp_path / "p.json"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return segment.read_prompts(str(path))


def test_the_key_sets_the_frame(tmp_path):
    """newcomer M3: {"lps": ...} was read as RAS unless "space" said LPS (a mirrored click);
    "position" and lists follow "space"; p9: no "-0.0" after the flip."""
    got, _ = _read(tmp_path, {"points": [{"lps": [20, 0, 30]}, {"ras": [20, 0, 30]}]})
    assert got == [([-20.0, 0.0, 30.0], True), ([20.0, 0.0, 30.0], True)]
    assert str(got[0][0][1]) == "0.0"
    got, _ = _read(
        tmp_path,
        {"space": "lps", "points": [{"position": [20, 5, 30], "positive": False}, [1, 2, 3, 1]]},
    )
    assert got == [([-20.0, -5.0, 30.0], False), ([-1.0, -2.0, 3.0], True)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"points": [{"ras": [1, 2, 3]}, {"ras": [4, 5, 6], "positive": "false"}]},
            "points[1].positive must be true or false, not the string 'false'",
        ),
        ({"points": [[1, 2, 3, "0"]]}, "points[0][3] (positive) must be true, false, 1 or 0"),
        ({"points": [[1, 2, 3, 2]]}, "points[0][3] (positive) must be true, false, 1 or 0"),
        (
            {"points": [{"ras": ["10", 2, 3]}]},
            "points[0].ras[0] must be a number, not the string '10'",
        ),
        ({"points": [{"ras": [True, 2, 3]}]}, "points[0].ras[0] must be a number, not true"),
        (
            {"point": [{"ras": [1, 2, 3]}]},
            "top level: unknown key 'point' (did you mean 'points'?)",
        ),
        ({"points": [{"RAS": [1, 2, 3]}]}, "points[0]: unknown key 'RAS' (did you mean 'ras'?)"),
        ({"points": [{"ras": [1, 2, 3], "lps": [1, 2, 3]}]}, "exactly one of 'ras', 'lps'"),
        (
            {"space": "LPS", "points": [{"ras": [1, 2, 3]}]},
            "points[0] is keyed 'ras' but the file says \"space\": 'LPS'",
        ),
        ({"space": "RAS", "points": [{"lps": [1, 2, 3]}]}, "keyed 'lps' but"),
        ({"points": 5}, "points must be a list, not int 5"),
        ({"points": [{"ras": [1, 2]}]}, "points[0].ras must be a list of three numbers"),
        ({"box": {"min": [0, 0, 0]}}, "box needs both 'min' and 'max'"),
        ({"box": {"min": [0, 0, 0], "max": [1, 1, 1], "lps": 1}}, "box: unknown key 'lps'"),
        ('{"points": [[1, 2, NaN]]}', "NaN is not a number JSON allows"),
        ('{"points": [], "points": [[1, 2, 3]]}', "key 'points' appears twice"),
    ],
    ids=[
        "positive-string",
        "flag-string",
        "flag-2",
        "coordinate-string",
        "coordinate-bool",
        "unknown-top-key",
        "upper-case-key",
        "two-frames",
        "ras-in-lps-space",
        "lps-in-ras-space",
        "points-int",
        "two-coordinates",
        "box-min-only",
        "box-extra-key",
        "nan-literal",
        "duplicate-key",
    ],
)
def test_schema_violations_name_the_entry(tmp_path, data, message):
    """reliability #15 ("false" and "0" were positive clicks), #25; newcomer m9 (a typo key
    was ignored; {"RAS": ...} gave "expected numbers ... (got '')")."""
    with pytest.raises(ValueError) as err:
        _read(tmp_path, data)
    assert message in str(err.value)
    assert str(tmp_path / "p.json") in str(err.value)


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize("kind", ["positive-string", "not-utf8", "folder", "points-int"])
def test_bad_prompt_files_exit_2_before_reading_the_image(tmp_path, capsys, kind):
    """reliability #25: rc 1 with a raw TypeError / UnicodeDecodeError / IsADirectoryError."""
    vol = blob_volume()
    vol.write(tmp_path / "img.nrrd")
    prompts = tmp_path / "p.json"
    if kind == "positive-string":
        prompts.write_text('{"points": [{"ras": [-4, 8, 15], "positive": "false"}]}')
        message = "positive must be true or false"
    elif kind == "not-utf8":
        prompts.write_bytes(b'{"points": [[1, 2, 3]], "\xff\xfe": 1}')
        message = "is not UTF-8 text"
    elif kind == "folder":
        prompts.mkdir()
        message = "is a folder"
    else:
        prompts.write_text('{"points": 5}')
        message = "points must be a list"
    before = listing(tmp_path)
    rc = main(
        [
            "segment",
            str(tmp_path / "img.nrrd"),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "m.nii.gz"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "reading" not in err
    assert listing(tmp_path) == before


@pytest.mark.usefixtures("no_model")
def test_only_negative_clicks_are_refused(tmp_path, capsys):
    """newcomer p7: a lone negative click gave '0 voxels', exit 0."""
    vol = blob_volume()
    vol.write(tmp_path / "img.nrrd")
    rc = main(
        [
            "segment",
            str(tmp_path / "img.nrrd"),
            "--point=-4,8,15:-",
            "--out",
            str(tmp_path / "m.nii.gz"),
        ]
    )
    assert rc == 2 and "only negative clicks" in capsys.readouterr().err
