from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainbus.worker import DatasetError, default_registry
from trainbus.worker._datasets import CSVParams, load_csv


def test_builtin_datasets_are_real_and_split_deterministically(data_dir: Path) -> None:
    entry = default_registry().dataset("digits")
    first = entry.load(entry.params(), 3, 0.2, data_dir)
    again = entry.load(entry.params(), 3, 0.2, data_dir)
    other = entry.load(entry.params(), 4, 0.2, data_dir)
    assert first.num_features == 64 and first.num_classes == 10
    assert len(first.y_train) + len(first.y_val) == 1797
    assert torch.equal(first.x_train, again.x_train)
    assert not torch.equal(first.y_val, other.y_val)
    assert abs(float(first.x_train.mean())) < 1e-4  # standardised with train statistics


def write_csv(folder: Path, name: str = "points.csv") -> Path:
    rows = ["a,b,label"] + [f"{i},{i % 7},{i % 2}" for i in range(40)]
    path = folder / name
    path.write_text("\n".join(rows))
    return path


def test_csv_reads_a_file_by_name_from_the_data_folder(data_dir: Path, datasets_dir: Path) -> None:
    write_csv(datasets_dir)
    split = load_csv(CSVParams(file="points.csv"), 0, 0.25, data_dir)
    assert split.task == "classification" and split.num_classes == 2
    assert split.num_features == 2


def test_csv_refuses_symlinks_out_of_the_folder(
    data_dir: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    secret = write_csv(tmp_path, "secret.csv")
    os.symlink(secret, datasets_dir / "link.csv")
    with pytest.raises(DatasetError, match="outside"):
        load_csv(CSVParams(file="link.csv"), 0, 0.25, data_dir)


def test_a_missing_csv_names_what_is_there(data_dir: Path, datasets_dir: Path) -> None:
    write_csv(datasets_dir)
    with pytest.raises(DatasetError, match=r"available: points\.csv"):
        load_csv(CSVParams(file="nope.csv"), 0, 0.25, data_dir)


@pytest.mark.parametrize(
    "name", ["../x.csv", "/etc/passwd", "a/b.csv", "x\x00.csv", "..", "%2e%2e"]
)
def test_csv_names_that_are_paths_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="bare file name"):
        CSVParams(file=name)


def test_plugins_come_from_entry_points_and_never_replace_an_entry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from trainbus.worker import ModelEntry, Registry, _registry
    from trainbus.worker._models import LinearParams, build_linear

    tiny = ModelEntry("tiny", LinearParams, build_linear, "a plugin model")
    impostor = ModelEntry("mlp", LinearParams, build_linear, "replaces a built-in")
    points = {
        "tiny": tiny,
        "mlp": impostor,
    }

    class FakePoint:
        def __init__(self, name: str) -> None:
            self.name = name

        def load(self) -> object:
            if self.name == "broken":
                raise ImportError("missing dependency")
            return points[self.name]

    def fake_entry_points(group: str) -> list[FakePoint]:
        if group == "trainbus.models":
            return [FakePoint("tiny"), FakePoint("mlp"), FakePoint("broken")]
        return []

    monkeypatch.setattr(_registry, "entry_points", fake_entry_points)
    registry = Registry()
    for entry in _registry.BUILTIN_MODELS:
        registry.add_model(entry)
    registry.load_plugins()
    assert registry.model("tiny") is tiny
    assert registry.model("mlp").description == "A multi-layer perceptron."
    assert "name 'mlp' is taken" in caplog.text and "missing dependency" in caplog.text
    described = registry.describe()
    names = [m["name"] for m in described["models"]]
    assert names == ["cnn", "linear", "mlp", "tiny"]
    assert described["models"][2]["params"]["properties"]["hidden_sizes"]["type"] == "array"
