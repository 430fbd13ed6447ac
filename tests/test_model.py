"""MobileViT structure: patch unfold/fold, parameter counts, sizes, serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from training.model import VARIANTS, AlignTo, Fold, ResizeTo, Unfold, build_model


def test_fold_inverts_unfold():
    x = np.random.default_rng(0).normal(size=(3, 12, 10, 5)).astype("float32")
    patches = Unfold(2)(x)
    assert tuple(patches.shape) == (3 * 4, 6 * 5, 5)
    np.testing.assert_array_equal(np.asarray(Fold(12, 10, 2)(patches)), x)


def test_unfold_groups_same_pixel_position_of_every_patch():
    """Sequence k of image b holds pixel position k of each 2x2 patch: real patches, not bands."""
    x = np.random.default_rng(1).normal(size=(2, 8, 6, 4)).astype("float32")
    patches = np.asarray(Unfold(2)(x))
    for b in range(2):
        for k, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            expected = x[b, dy::2, dx::2].reshape(-1, 4)
            np.testing.assert_array_equal(patches[b * 4 + k], expected)


def test_unfold_refuses_indivisible_maps():
    with pytest.raises(ValueError, match="not divisible"):
        Unfold(2)(np.zeros((1, 5, 5, 3), "float32"))


@pytest.mark.parametrize(("variant", "paper_millions"), [("xxs", 1.3), ("xs", 2.3), ("s", 5.6)])
def test_parameter_counts_match_paper(variant, paper_millions):
    params = build_model(variant, num_classes=1000, image_size=256).count_params()
    assert abs(params / 1e6 - paper_millions) / paper_millions < 0.05, params


def test_attention_runs_over_patches():
    model = build_model("xxs", num_classes=5, image_size=128)
    attn = model.get_layer("layer3_mvit_transformer_layer0_attn")
    # layer3 runs at 1/8: a 16x16 map -> 64 patches of 2x2, width d = 64.
    assert tuple(attn.input[0].shape) == (None, 64, 64)
    unfold = model.get_layer("layer3_mvit_unfold")
    assert tuple(unfold.output.shape) == (None, 64, 64)


@pytest.mark.parametrize("size", [160, 224])
def test_sizes_with_odd_last_map_forward_any_batch(size):
    """At 160/224 px the last map is 5x5/7x7: resized to 6x6/8x8 around attention, not scrambled."""
    model = build_model("xxs", num_classes=4, image_size=size)
    assert any(isinstance(layer, ResizeTo) for layer in model.layers)
    x = np.random.default_rng(2).uniform(0, 255, (3, size, size, 3)).astype("float32")
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # Each image's output is independent of its batch-mates (no mixing across the batch).
    single = np.asarray(model(x[1:2], training=False))
    np.testing.assert_allclose(single[0], probs[1], atol=1e-5)


def test_a_model_of_any_size_matches_the_fixed_size_models_with_its_weights(tmp_path):
    """Multi-scale training: one set of weights, batches at several sizes. Loaded into a model of
    one fixed size (what export ships) the weights give the same outputs, also after a reload."""
    model = build_model("xxs", num_classes=3, image_size=None)
    assert model.input_shape == (None, None, None, 3)
    model.save(tmp_path / "any.keras")
    reloaded = keras.models.load_model(tmp_path / "any.keras")
    for size in (64, 96, 160):  # 160: the last map is 5x5, aligned to 6x6 and back
        fixed = build_model("xxs", num_classes=3, image_size=size)
        fixed.set_weights(model.get_weights())
        x = np.random.default_rng(size).uniform(0, 255, (2, size, size, 3)).astype("float32")
        expected = np.asarray(fixed(x, training=False))
        np.testing.assert_allclose(np.asarray(model(x, training=False)), expected, atol=1e-6)
        np.testing.assert_allclose(np.asarray(reloaded(x, training=False)), expected, atol=1e-6)


def test_align_resizes_up_to_the_patch_multiple_only_when_needed():
    x = np.random.default_rng(4).normal(size=(1, 4, 6, 2)).astype("float32")
    np.testing.assert_array_equal(np.asarray(AlignTo(2)(x)), x)
    assert tuple(AlignTo(2)(np.zeros((1, 5, 3, 2), "float32")).shape) == (1, 6, 4, 2)
    like = np.zeros((1, 5, 3, 2), "float32")
    assert tuple(ResizeTo()(np.zeros((1, 6, 4, 2), "float32"), like=like).shape) == (1, 5, 3, 2)


@pytest.mark.parametrize(("shape", "size"), [((5, 5), (6, 6)), ((6, 6), (5, 5)), ((4, 7), (4, 8))])
def test_run_time_size_resize_equals_keras_bilinear_resize(shape, size):
    """The any-size model's resize (for sizes known only at run time) is Keras' bilinear one,
    which the fixed-size models that export ships use."""
    from keras import ops

    from training.model import resize_bilinear

    x = np.random.default_rng(5).normal(size=(2, *shape, 3)).astype("float32")
    expected = np.asarray(ops.image.resize(x, size, interpolation="bilinear"))
    np.testing.assert_allclose(np.asarray(resize_bilinear(x, *size)), expected, atol=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("xxs", 5, 100)
    with pytest.raises(ValueError, match="unknown variant"):
        build_model("xxxl", 5, 128)
    assert set(VARIANTS) == {"xxs", "xs", "s"}


def test_keras_save_reload_gives_identical_outputs(tmp_path):
    model = build_model("xxs", num_classes=3, image_size=64)
    x = np.random.default_rng(3).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    expected = np.asarray(model(x, training=False))
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(np.asarray(reloaded(x, training=False)), expected)
    for layer in (Unfold(2), Fold(4, 6, 2), Fold(), ResizeTo(6, 6), ResizeTo(), AlignTo(2)):
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
