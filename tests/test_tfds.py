"""The tf_flowers path runs the real tensorflow-datasets loading code, offline on mock data."""

from __future__ import annotations

import pytest

tfds = pytest.importorskip("tensorflow_datasets")


def test_tf_flowers_loads_through_tensorflow_datasets():
    from training.train import load_dataset

    with tfds.testing.mock_data(num_examples=20):
        dataset = load_dataset({"tfds": "tf_flowers", "data": None})
    assert dataset.root == "tfds:tf_flowers"
    assert sorted(dataset.class_names) == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert len(dataset.images) == len(dataset.labels) == 20
    assert all(image.mode == "RGB" for image in dataset.images)
    assert set(dataset.labels.tolist()) <= set(range(5))
