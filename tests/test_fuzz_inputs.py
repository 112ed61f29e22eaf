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


def _config_keys():
    from deepatlas_fast.training.config import default_config

    def walk(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from walk(v, prefix + k + ".")
    return sorted(walk(default_config()))


_values = st.one_of(st.sampled_from(["", "1", "-1", "0", "1.5", "1e30", "-1e-3", ".nan", ".inf", "true", "null", "abc",
                                     "[]", "[0, 8, 8]", "[1, 2, 3, 4, 5]", "[a", "{x: 1}", "{LL: 1}", "!!python/object:os.system x",
                                     "'3'", "[0.5, 99.5]", "[99, 1]", "cuda:7", "9.5", "4"]),
                    st.text(max_size=12))


@settings(max_examples=400, deadline=None)
@given(overrides=st.lists(st.tuples(st.one_of(st.sampled_from(_config_keys()), st.text(max_size=10)), _values),
                          min_size=1, max_size=3))
def test_any_set_override_loads_or_fails_with_one_clear_line(overrides):
    """``--set KEY=VALUE`` strings: a valid config or a ConfigError with a one-line message."""
    from deepatlas_fast.errors import ConfigError
    from deepatlas_fast.training.config import load_config
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in overrides])
    except ConfigError as e:
        assert "\n" not in str(e).strip(), str(e)
        return
    assert isinstance(cfg["train"]["lr"], float | int) and 0 < cfg["train"]["lr"] <= 1


def test_config_files_that_are_not_configs(tmp_path):
    import pytest

    from deepatlas_fast.errors import ConfigError
    from deepatlas_fast.training.config import load_config
    cases = {"tag.yaml": "train:\n  lr: !!python/object/apply:os.system ['true']\n",
             "broken.yaml": "train: [1, 2\nloss: {",
             "binary.yaml": b"\xff\xfe\x00\x01",
             "list.yaml": "- 1\n- 2\n",
             "section.yaml": "train: 5\n"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(path) in str(info.value) or "section" in str(info.value)
        assert "\n" not in str(info.value), str(info.value)
