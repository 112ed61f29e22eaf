"""Fuzzing the text a user hands the package (hypothesis): any datalist JSON either reads or
raises the package's own error (or FileNotFoundError for a path that does not exist) with a
one-line message naming the file; never another exception."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepatlas_fast.data.datasets import read_datalist
from deepatlas_fast.errors import DeepAtlasError

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                     st.sampled_from(["", "img.nii.gz", "seg.nii.gz", "missing.nii.gz", "../x", "\x00"]),
                     st.text(max_size=8))
_json = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), c, max_size=3)), max_leaves=8)
_item = st.one_of(_json, st.fixed_dictionaries({"image": _scalars}, optional={"label": _scalars, "extra": _json}))
_datalist = st.one_of(_json, st.fixed_dictionaries(
    {}, optional={s: st.one_of(st.lists(_item, max_size=3), _json) for s in ("training", "validation", "test")}
    | {"labels": _json}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_datalist)
def test_any_datalist_reads_or_fails_with_one_clear_line(tmp_path, raw):
    for name in ("img.nii.gz", "seg.nii.gz"):
        (tmp_path / name).write_bytes(b"")  # existence is all the datalist reader checks
    path = tmp_path / "list.json"
    path.write_text(json.dumps(raw))
    try:
        out = read_datalist(path)
    except (DeepAtlasError, FileNotFoundError) as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return
    for split in ("training", "validation", "test"):
        for e in out[split]:
            assert e["image"].is_file() and (e["label"] is None or e["label"].is_file())


def test_files_of_the_wrong_kind_are_named(tmp_path):
    """An image given as a datalist, a binary or non-integer label file, a damaged run.json."""
    import pytest

    from deepatlas_fast.data.io import LabelTable
    from deepatlas_fast.errors import DataError
    from deepatlas_fast.training.run_folder import read_run_info
    (tmp_path / "x.nii.gz").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(DataError, match="x.nii.gz is an image"):
        read_datalist(tmp_path / "x.nii.gz")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(DataError, match="bin.json: not a datalist .not valid JSON"):
        read_datalist(tmp_path / "bin.json")
    (tmp_path / "labels.txt").write_text("0 2 3\n4 five # comment\n")
    with pytest.raises(DataError, match="labels.txt: 'five' is not an integer label value"):
        LabelTable.from_file(tmp_path / "labels.txt")
    (tmp_path / "labels.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="labels.bin: not a text file"):
        LabelTable.from_file(tmp_path / "labels.bin")
    assert LabelTable.from_file(_write(tmp_path / "ok.txt", "2, 3 # x\n17\n")).values == [0, 2, 3, 17]
    (tmp_path / "run").mkdir()
    assert read_run_info(tmp_path / "run") == {}
    for bad in ("{", "[1, 2]"):
        (tmp_path / "run" / "run.json").write_text(bad)
        with pytest.raises(DataError, match="run.json: damaged"):
            read_run_info(tmp_path / "run")


def _write(path, text):
    path.write_text(text)
    return path
