"""The package's error types, and the command line's one-line messages for them (only them)."""
import sys

from pathlib import Path

import pytest
import torch

from deepatlas_fast.cli import main
from deepatlas_fast.errors import (ConfigError, ConfigKeyError, DataError, DeepAtlasError, DeepAtlasWarning,
                                   MissingDependencyError)


def test_hierarchy_keeps_the_builtin_types():
    for cls in (ConfigError, ConfigKeyError, DataError, MissingDependencyError):
        assert issubclass(cls, DeepAtlasError) and issubclass(cls, ValueError)
    assert issubclass(ConfigKeyError, KeyError) and issubclass(MissingDependencyError, ImportError)
    assert issubclass(DeepAtlasWarning, UserWarning)
    assert str(ConfigKeyError("unknown config key 'x'")) == "unknown config key 'x'"  # not quoted as KeyError does


def test_package_errors_from_the_api():
    from deepatlas_fast.data.io import load_nifti
    from deepatlas_fast.training.config import load_config
    with pytest.raises(ConfigKeyError, match="train.lrr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="similarity"):
        load_config(None, ["loss.similarity=mse"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["train.lr=[1"])
    with pytest.raises(DataError, match="NIfTI"):
        load_nifti(__file__)


def test_config_error_is_one_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepatlas-fast train: error: ") and "unknown config key 'train.lrr'" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_onnxruntime_is_one_line_with_an_install_hint(tmp_path, capsys, monkeypatch):
    from deepatlas_fast.deploy.runtime import default_providers
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'deepatlas_fast\[onnx\]'"):
        default_providers()
    with pytest.raises(ImportError):  # still an ImportError for callers that catch that
        default_providers()
    assert main(["segment", "--onnx", str(tmp_path), "in.nii.gz", "-o", str(tmp_path / "out.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "deepatlas_fast[onnx]" in err and "Traceback" not in err


def test_other_exceptions_are_not_hidden(monkeypatch):
    """A ValueError, KeyError or ImportError that is not the package's own is a bug: it keeps its
    traceback instead of becoming a one-line message."""
    from deepatlas_fast.cli.commands import segment

    for exc in (ValueError("a bug"), KeyError("a bug"), ImportError("a bug")):
        def run(args, exc=exc):
            raise exc
        monkeypatch.setattr(segment, "run", run)
        with pytest.raises(type(exc), match="a bug"):
            main(["segment", "--run", "r", "in.nii.gz", "-o", "out.nii.gz"])


def test_demo_checks_update_doc_before_running(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("no block here\n")
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), "--update-doc", str(doc)]) == 2
    assert "<!-- demo:quick:start -->" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,message", [("tpu", "'cpu', 'cuda' or 'cuda:N'"), ("", "'cpu', 'cuda' or 'cuda:N'"),
                                          ("meta", "runs on 'cpu' or 'cuda'"), ("cuda:9999", "CUDA device")])
def test_devices_this_machine_lacks_are_clear_errors(name, message):
    from deepatlas_fast.devices import resolve_device
    from deepatlas_fast.errors import DeepAtlasError
    with pytest.raises(DeepAtlasError, match=message):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists")
def test_cli_device_without_cuda_is_one_line(tmp_path_factory, tmp_path, capsys):
    from _synth import tiny_run
    from deepatlas_fast.cli import main
    dl, run = tiny_run(tmp_path_factory.getbasetemp())
    img = str(Path(dl).parent / "img0.nii.gz")
    assert main(["segment", "--run", str(run), img, "-o", str(tmp_path / "s.nii.gz"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and err.count("\n") == 1
    assert main(["train", "--data", str(dl), "--out", str(tmp_path / "r"), "--set", "device=cuda:1"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err and not (tmp_path / "r").exists()
