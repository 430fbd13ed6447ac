"""MobileViT v1 (Mehta & Rastegari, ICLR 2022) as defined by apple/ml-cvnets, in pure Keras 3 ops.

Variants are rows of `VARIANTS`, all built by `build_model`. The only custom layers are the
weight-free patch operations (`Unfold`, `Fold`, `ResizeTo`, `AlignTo`); everything with weights is
a stock Keras layer, so `.keras` files, SavedModel export and TFLite conversion need no special
handling. `build_model(image_size=None)` takes any size: the patch operations then read their
sizes from the tensors they are given (multi-scale training); the same weights load into a model
of one fixed size for export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers, ops

PATCH_SIZE = 2
NUM_HEADS = 4
#: How a stride-2 3x3 convolution pads. "symmetric": one pixel on every side, as the paper's
#: ml-cvnets and timm do (so timm's weights give timm's numbers). "same": Keras' "same", which on
#: an even input pads only bottom and right; models trained before the builder followed timm (the
#: shipped flowers-mobilevit-xxs 1.1.0) record it, so their weights are rebuilt as trained.
PADDINGS = ("symmetric", "same")


@dataclass(frozen=True)
class Variant:
    """One row of the paper's architecture table (Table 4, ml-cvnets `mobilevit.py` config)."""

    stem: int
    expansion: int
    channels: tuple[int, int, int, int, int]  # outputs of layer1..layer5
    dims: tuple[int, int, int]  # transformer width d of layer3..layer5
    depths: tuple[int, int, int]  # transformer layers L of layer3..layer5
    last: int  # final 1x1 conv width
    dropout: float  # classifier dropout


VARIANTS: dict[str, Variant] = {
    "xxs": Variant(16, 2, (16, 24, 48, 64, 80), (64, 80, 96), (2, 4, 3), 320, 0.1),
    "xs": Variant(16, 4, (32, 48, 64, 80, 96), (96, 120, 144), (2, 4, 3), 384, 0.1),
    "s": Variant(16, 4, (32, 64, 96, 128, 160), (144, 192, 240), (2, 4, 3), 640, 0.1),
}


@keras.saving.register_keras_serializable(package="mobilevit")
class Unfold(layers.Layer):
    """Split a feature map into non-overlapping p x p patches, one sequence per pixel position.

    [B, H, W, C] -> [B*p*p, N, C] with N = (H/p)*(W/p): attention then runs across the N patches,
    separately for each of the p*p positions inside a patch (the paper's unfold).
    """

    def __init__(self, patch_size: int = PATCH_SIZE, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, x):
        _, height, width, channels = ops.shape(x)
        p = self.patch_size
        _check_divisible(height, width, p, self.name)
        nh, nw = height // p, width // p
        x = ops.reshape(x, (-1, p, nw, p * channels))  # [B, H, W, C] -> [B*nh, p, nw, p*C]
        x = ops.transpose(x, (0, 2, 1, 3))  # -> [B*nh, nw, p(row), p(col)*C]
        x = ops.reshape(x, (-1, nh * nw, p * p, channels))  # -> [B, N, p*p, C]
        x = ops.transpose(x, (0, 2, 1, 3))  # -> [B, p*p, N, C]
        return ops.reshape(x, (-1, nh * nw, channels))  # -> [B*p*p, N, C]

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        p = self.patch_size
        batch = None if batch is None else batch * p * p
        patches = None if height is None or width is None else (height // p) * (width // p)
        return (batch, patches, channels)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package="mobilevit")
class Fold(layers.Layer):
    """Exact inverse of `Unfold`: [B*p*p, N, C] -> [B, H, W, C]. H and W are fixed, or (both
    None) those of `like`, the map that was unfolded."""

    def __init__(
        self, height: int | None = None, width: int | None = None, patch_size: int = PATCH_SIZE,
        **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        self.height, self.width, self.patch_size = height, width, patch_size

    def call(self, x, like=None):
        channels = x.shape[-1]
        p = self.patch_size
        height, width = (self.height, self.width) if like is None else ops.shape(like)[1:3]
        _check_divisible(height, width, p, self.name)
        nh, nw = height // p, width // p
        x = ops.reshape(x, (-1, p * p, nh * nw, channels))  # [B*p*p, N, C] -> [B, p*p, N, C]
        x = ops.transpose(x, (0, 2, 1, 3))  # -> [B, N, p*p, C]
        x = ops.reshape(x, (-1, nw, p, p * channels))  # -> [B*nh, nw, p(row), p(col)*C]
        x = ops.transpose(x, (0, 2, 1, 3))  # -> [B*nh, p, nw, p*C]
        return ops.reshape(x, (-1, height, width, channels))  # -> [B, H, W, C]

    def compute_output_shape(self, x_shape, like_shape=None):
        batch = x_shape[0]
        p = self.patch_size
        batch = None if batch is None else batch // (p * p)
        height, width = (self.height, self.width) if like_shape is None else like_shape[1:3]
        return (batch, height, width, x_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "height": self.height,
            "width": self.width,
            "patch_size": self.patch_size,
        }


@keras.saving.register_keras_serializable(package="mobilevit")
class ResizeTo(layers.Layer):
    """Bilinear resize to a fixed size, or (both None) to the size of `like`: ml-cvnets' fix for
    maps not divisible by the patch, undone after the fold."""

    def __init__(self, height: int | None = None, width: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.height, self.width = height, width

    def call(self, x, like=None):
        if like is None:
            return ops.image.resize(x, (self.height, self.width), interpolation="bilinear")
        return resize_bilinear(x, *ops.shape(like)[1:3])

    def compute_output_shape(self, x_shape, like_shape=None):
        height, width = (self.height, self.width) if like_shape is None else like_shape[1:3]
        return (x_shape[0], height, width, x_shape[-1])

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width}


@keras.saving.register_keras_serializable(package="mobilevit")
class AlignTo(layers.Layer):
    """Bilinear resize up to the next multiple of `multiple` in each direction, for a model of
    any input size (a fixed-size model uses `ResizeTo` only where its maps need it)."""

    def __init__(self, multiple: int = PATCH_SIZE, **kwargs):
        super().__init__(**kwargs)
        self.multiple = multiple

    def call(self, x):
        height, width = ops.shape(x)[1:3]
        if _known(height, width) and not (height % self.multiple or width % self.multiple):
            return x
        m = self.multiple
        return resize_bilinear(x, -(-height // m) * m, -(-width // m) * m)

    def compute_output_shape(self, input_shape):
        m = self.multiple
        return (
            input_shape[0],
            *(None if d is None else -(-d // m) * m for d in input_shape[1:3]),
            input_shape[-1],
        )

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple}


def resize_bilinear(x, height, width):
    """`ops.image.resize(x, (height, width), "bilinear")` for sizes that may be known only at run
    time (Keras' resize wants Python ints in TensorFlow's graph mode). Each axis is a matrix of
    triangle-kernel weights: bilinear interpolation with half-pixel centres, edges clamped."""
    x = ops.einsum("ih,bhwc->biwc", _interpolation(height, ops.shape(x)[1], x.dtype), x)
    return ops.einsum("jw,biwc->bijc", _interpolation(width, ops.shape(x)[2], x.dtype), x)


def _interpolation(out, size, dtype):
    """[out, size] weights: row i interpolates output pixel i from the input pixels."""
    source = (ops.cast(ops.arange(out), dtype) + 0.5) * ops.cast(size / out, dtype) - 0.5
    source = ops.clip(source, 0.0, ops.cast(size, dtype) - 1.0)
    return ops.relu(1.0 - ops.abs(source[:, None] - ops.cast(ops.arange(size), dtype)[None, :]))


def _known(*sizes) -> bool:
    return all(isinstance(size, int) for size in sizes)


def _check_divisible(height, width, patch, name):
    if not _known(height, width):
        return  # only known at run time (a model of any size): AlignTo made it divisible
    if height % patch or width % patch:
        raise ValueError(f"{name}: feature map {height}x{width} is not divisible by patch {patch}")


def _strided_input(x, stride: int, padding: str, name: str):
    """(input, Keras padding) for a 3x3 convolution of `stride` under the model's `padding`."""
    if stride == 2 and padding == "symmetric":
        return layers.ZeroPadding2D(1, name=f"{name}pad")(x), "valid"
    return x, "same"


def _conv_bn(x, filters: int, kernel: int, stride: int = 1, act: bool = True, name: str = "",
             padding: str = "symmetric"):  # fmt: skip
    x, mode = _strided_input(x, stride, padding, name)
    x = layers.Conv2D(filters, kernel, stride, padding=mode, use_bias=False, name=f"{name}conv")(x)
    x = layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=f"{name}bn")(x)
    return layers.Activation("silu", name=f"{name}act")(x) if act else x


def _inverted_residual(x, filters: int, stride: int, expansion: int, name: str, padding: str):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project, residual if same shape."""
    inputs = x
    hidden = x.shape[-1] * expansion
    x = _conv_bn(x, hidden, 1, name=f"{name}expand_")
    x, mode = _strided_input(x, stride, padding, f"{name}dw_")
    x = layers.DepthwiseConv2D(3, stride, padding=mode, use_bias=False, name=f"{name}dw_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=f"{name}dw_bn")(x)
    x = layers.Activation("silu", name=f"{name}dw_act")(x)
    x = _conv_bn(x, filters, 1, act=False, name=f"{name}project_")
    if stride == 1 and inputs.shape[-1] == filters:
        x = layers.Add(name=f"{name}add")([inputs, x])
    return x


def _transformer(x, dim: int, depth: int, dropout: float, name: str):
    """Pre-norm encoder layers (4 heads, FFN 2d with SiLU), then the final LayerNorm."""
    for i in range(depth):
        prefix = f"{name}layer{i}_"
        y = layers.LayerNormalization(epsilon=1e-5, name=f"{prefix}attn_norm")(x)
        y = layers.MultiHeadAttention(
            NUM_HEADS, dim // NUM_HEADS, dropout=0.0, name=f"{prefix}attn"
        )(y, y)
        y = layers.Dropout(dropout, name=f"{prefix}attn_drop")(y)
        x = layers.Add(name=f"{prefix}attn_add")([x, y])
        y = layers.LayerNormalization(epsilon=1e-5, name=f"{prefix}ffn_norm")(x)
        y = layers.Dense(2 * dim, activation="silu", name=f"{prefix}ffn_in")(y)
        y = layers.Dense(dim, name=f"{prefix}ffn_out")(y)
        y = layers.Dropout(dropout, name=f"{prefix}ffn_drop")(y)
        x = layers.Add(name=f"{prefix}ffn_add")([x, y])
    return layers.LayerNormalization(epsilon=1e-5, name=f"{name}norm")(x)


def _mobilevit_block(x, dim: int, depth: int, dropout: float, name: str):
    """Local 3x3 conv, 1x1 to d, global attention over unfolded patches, fold, fuse with input."""
    inputs = x
    channels = x.shape[-1]
    x = _conv_bn(x, channels, 3, name=f"{name}local_")
    x = layers.Conv2D(dim, 1, use_bias=False, name=f"{name}to_d")(x)  # no norm, no activation
    height, width = x.shape[1], x.shape[2]
    if height is None or width is None:  # a model of any size: sizes come from the tensors
        mapped = x
        x = aligned = AlignTo(PATCH_SIZE, name=f"{name}align")(x)
        x = Unfold(PATCH_SIZE, name=f"{name}unfold")(x)
        x = _transformer(x, dim, depth, dropout, name=f"{name}transformer_")
        x = Fold(patch_size=PATCH_SIZE, name=f"{name}fold")(x, like=aligned)
        x = ResizeTo(name=f"{name}unalign")(x, like=mapped)
        return _fuse(inputs, x, channels, name)
    aligned_h = -(-height // PATCH_SIZE) * PATCH_SIZE
    aligned_w = -(-width // PATCH_SIZE) * PATCH_SIZE
    if (aligned_h, aligned_w) != (height, width):
        x = ResizeTo(aligned_h, aligned_w, name=f"{name}align")(x)
    x = Unfold(PATCH_SIZE, name=f"{name}unfold")(x)  # [B, H, W, d] -> [B*4, N, d]
    x = _transformer(x, dim, depth, dropout, name=f"{name}transformer_")
    x = Fold(aligned_h, aligned_w, PATCH_SIZE, name=f"{name}fold")(x)  # -> [B, H, W, d]
    if (aligned_h, aligned_w) != (height, width):
        x = ResizeTo(height, width, name=f"{name}unalign")(x)
    return _fuse(inputs, x, channels, name)


def _fuse(inputs, x, channels: int, name: str):
    """1x1 back to the block's channels, concatenated with its input, fused by a 3x3."""
    x = _conv_bn(x, channels, 1, name=f"{name}proj_")
    x = layers.Concatenate(name=f"{name}concat")([inputs, x])
    return _conv_bn(x, channels, 3, name=f"{name}fusion_")


def build_model(
    variant: str = "xxs",
    num_classes: int = 1000,
    image_size: int | None = 256,
    transformer_dropout: float = 0.0,
    padding: str = "symmetric",
) -> keras.Model:
    """MobileViT taking RGB pixels in 0..255 ([N, S, S, 3]) and returning class probabilities;
    `image_size=None` takes any S (multiple of 32) per batch."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; choose one of {PADDINGS}")
    if image_size is not None and (image_size < 64 or image_size % 32):
        raise ValueError(f"image_size must be a multiple of 32 and at least 64, got {image_size}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    cfg = VARIANTS[variant]
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = _conv_bn(x, cfg.stem, 3, stride=2, name="stem_", padding=padding)
    x = _inverted_residual(x, cfg.channels[0], 1, cfg.expansion, "layer1_0_", padding)
    for i, stride in enumerate((2, 1, 1)):
        x = _inverted_residual(x, cfg.channels[1], stride, cfg.expansion, f"layer2_{i}_", padding)
    for stage in range(3):
        name = f"layer{stage + 3}_"
        x = _inverted_residual(
            x, cfg.channels[stage + 2], 2, cfg.expansion, f"{name}down_", padding
        )
        x = _mobilevit_block(
            x, cfg.dims[stage], cfg.depths[stage], transformer_dropout, name=f"{name}mvit_"
        )
    x = _conv_bn(x, cfg.last, 1, name="last_")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(cfg.dropout, name="head_drop")(x)
    # float32 head so probabilities stay float32 under a mixed-precision policy.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"mobilevit_{variant}")


def padding_of(model: keras.Model) -> str:
    """The `padding` a model was built with (symmetric models have explicit padding layers)."""
    names = {layer.name for layer in model.layers}
    return "symmetric" if "stem_pad" in names else "same"


def load_keras(path: str | Path) -> keras.Model:
    """A `.keras` file of this builder. Use this, not `keras.models.load_model`, in a module that
    does not otherwise import this one: the file names layers (Unfold, Fold, ...) that Keras can
    rebuild only once this module has registered them."""
    return keras.models.load_model(path)
