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
