"""Convert a timm MobileViT v1 checkpoint (safetensors) into this project's Keras model.

    python -m training.pretrained model.safetensors --out mobilevit_xxs_in1k.keras

The weights: `timm/mobilevit_xxs.cvnets_in1k` (also `_xs`, `_s`) on the Hugging Face hub,
`model.safetensors`, Apple's ImageNet-1k weights under the cvnets licence (docs/training.md says
how to fetch them). The variant is read from the shapes; the Keras model keeps the checkpoint's
own classifier head, takes RGB pixels 0..255 like every model here, and loads with
`keras.saving.load_model`. cvnets v1 weights were trained on BGR input, so the stem's input
channels are flipped (`--source-channels rgb` leaves them). The key mapping is a table
(`timm_table`): another source (Hugging Face `apple/mobilevit-*`) is one more table. Checkpoints
are read with safetensors' numpy API; pickled PyTorch files are refused, never unpickled.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.model import VARIANTS, build_model

#: Width of the final 1x1 convolution -> variant (the paper's table).
VARIANT_BY_LAST = {cfg.last: name for name, cfg in VARIANTS.items()}
MARKER_KEY = "stages.2.1.transformer.0.attn.qkv.weight"
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointError(ValueError):
    """The file is not a checkpoint this converter can read; the message says what was found."""


# ---- reading ---------------------------------------------------------------------------------


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy (float16 weights become float32)."""
    try:
        head = path.open("rb").read(8)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if head.startswith(PICKLE_MAGIC) or path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise CheckpointError(
            f"{path} is a pickled PyTorch file, which is never unpickled here (it can run code). "
            "Use the checkpoint's model.safetensors: `hf download "
            "timm/mobilevit_xxs.cvnets_in1k model.safetensors`, or convert it on a trusted "
            "machine with safetensors.torch.save_file"
        )
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in tensors.items()}


def infer_variant(tensors: dict[str, np.ndarray]) -> str:
    """xxs, xs or s from the final convolution's width; a clear error for anything else."""
    if MARKER_KEY not in tensors:
        if any("qkv_proj" in k for k in tensors):
            found = "a MobileViT v2 checkpoint (separable linear attention)"
        elif "conv1.weight" in tensors and any(k.startswith("layer1.") for k in tensors):
            found = "a ResNet-style checkpoint"
        else:
            found = f"{len(tensors)} tensors, e.g. {sorted(tensors)[:3]}"
        raise CheckpointError(
            f"not a timm MobileViT v1 checkpoint (no {MARKER_KEY}): found {found}"
        )
    key = "final_conv.conv.weight"
    if key not in tensors:
        raise CheckpointError(f"missing key {key}")
    width = int(tensors[key].shape[0])
    if width not in VARIANT_BY_LAST:
        raise CheckpointError(f"{key} has {width} outputs; MobileViT v1 variants have "
                              f"{sorted(VARIANT_BY_LAST)}")  # fmt: skip
    return VARIANT_BY_LAST[width]


# ---- the mapping table -----------------------------------------------------------------------

# Keras layer kind -> the timm tensors it takes (suffixes of the row's prefix) and how they
# become the layer's weights, in `layer.weights` order.
Converter = Callable[[list[np.ndarray], int], list[np.ndarray]]


def _conv(ts, _):
    return [ts[0].transpose(2, 3, 1, 0)]  # [out, in, kh, kw] -> [kh, kw, in, out]


def _depthwise(ts, _):
    return [ts[0].transpose(2, 3, 0, 1)]  # [c, 1, kh, kw] -> [kh, kw, c, 1]


def _dense(ts, _):
    return [ts[0].T, ts[1]]


def _identity(ts, _):
    return list(ts)


def _attention(ts, heads):
    """timm's one qkv Linear (rows [q | k | v]) + proj -> Keras MultiHeadAttention."""
    qkv_w, qkv_b, proj_w, proj_b = ts
    dim = qkv_w.shape[1]
    head = dim // heads
    weights = []
    for part in range(3):
        w = qkv_w[part * dim : (part + 1) * dim]  # [d_out, d_in] of q, k or v
        b = qkv_b[part * dim : (part + 1) * dim]
        weights += [w.T.reshape(dim, heads, head), b.reshape(heads, head)]
    return [*weights, proj_w.T.reshape(heads, head, dim), proj_b]


KINDS: dict[str, tuple[tuple[str, ...], Converter]] = {
    "conv": (("weight",), _conv),
    "depthwise": (("weight",), _depthwise),
    "bn": (("weight", "bias", "running_mean", "running_var"), _identity),
    "ln": (("weight", "bias"), _identity),
    "dense": (("weight", "bias"), _dense),
    "attention": (("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"), _attention),
}


def _conv_bn(
    keras_name: str, timm_name: str, depthwise: bool = False
) -> list[tuple[str, str, str]]:
    kind = "depthwise" if depthwise else "conv"
    return [
        (f"{keras_name}conv", kind, f"{timm_name}.conv"),
        (f"{keras_name}bn", "bn", f"{timm_name}.bn"),
    ]


def _mv2(keras_name: str, timm_name: str) -> list[tuple[str, str, str]]:
    return [
        *_conv_bn(f"{keras_name}expand_", f"{timm_name}.conv1_1x1"),
        (f"{keras_name}dw_conv", "depthwise", f"{timm_name}.conv2_kxk.conv"),
        (f"{keras_name}dw_bn", "bn", f"{timm_name}.conv2_kxk.bn"),
        *_conv_bn(f"{keras_name}project_", f"{timm_name}.conv3_1x1"),
    ]


def timm_table(variant: str) -> list[tuple[str, str, str]]:
    """(Keras layer, kind, timm prefix) for every layer with weights, in model order."""
    cfg = VARIANTS[variant]
    rows = [*_conv_bn("stem_", "stem"), *_mv2("layer1_0_", "stages.0.0")]
    rows += [row for i in range(3) for row in _mv2(f"layer2_{i}_", f"stages.1.{i}")]
    for stage in range(3):
        keras_name, timm_name = f"layer{stage + 3}_", f"stages.{stage + 2}"
        rows += _mv2(f"{keras_name}down_", f"{timm_name}.0")
        block, mvit = f"{timm_name}.1", f"{keras_name}mvit_"
        rows += _conv_bn(f"{mvit}local_", f"{block}.conv_kxk")
        rows.append((f"{mvit}to_d", "conv", f"{block}.conv_1x1"))
        for i in range(cfg.depths[stage]):
            layer, t = f"{mvit}transformer_layer{i}_", f"{block}.transformer.{i}"
            rows += [
                (f"{layer}attn_norm", "ln", f"{t}.norm1"),
                (f"{layer}attn", "attention", f"{t}.attn"),
                (f"{layer}ffn_norm", "ln", f"{t}.norm2"),
                (f"{layer}ffn_in", "dense", f"{t}.mlp.fc1"),
                (f"{layer}ffn_out", "dense", f"{t}.mlp.fc2"),
            ]
        rows.append((f"{mvit}transformer_norm", "ln", f"{block}.norm"))
        rows += _conv_bn(f"{mvit}proj_", f"{block}.conv_proj")
        rows += _conv_bn(f"{mvit}fusion_", f"{block}.conv_fusion")
    rows += _conv_bn("last_", "final_conv")
    rows.append(("probs", "dense", "head.fc"))
    return rows


# ---- converting ------------------------------------------------------------------------------


def convert(tensors: dict[str, np.ndarray], image_size: int = 256, source_channels: str = "bgr"):
    """The Keras model holding the checkpoint's weights (its own head included)."""
    variant = infer_variant(tensors)
    classes = int(tensors["head.fc.weight"].shape[0]) if "head.fc.weight" in tensors else 0
    if classes < 2:
        raise CheckpointError("missing key head.fc.weight (the classifier head)")
    model = build_model(variant, classes, image_size, padding="symmetric")
    used: set[str] = set()
    for layer_name, kind, prefix in timm_table(variant):
        suffixes, to_keras = KINDS[kind]
        keys = [f"{prefix}.{suffix}" for suffix in suffixes]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(f"missing key {missing[0]} (for Keras layer {layer_name})")
        layer = model.get_layer(layer_name)
        values = to_keras([tensors[k] for k in keys], 4)
        for key, weight, value in zip(_keys_for(keys, len(values)), layer.weights, values,
                                      strict=True):  # fmt: skip
            if tuple(weight.shape) != value.shape:
                wanted = tuple(weight.shape)
                raise CheckpointError(f"shape mismatch at {key}: the checkpoint's converts to "
                                      f"{value.shape}, {weight.path} is {wanted}")  # fmt: skip
        if layer_name == "stem_conv" and source_channels == "bgr":
            values = [values[0][:, :, ::-1, :]]  # BGR-trained stem takes RGB now
        layer.set_weights(values)
        used.update(keys)
    extra = sorted(k for k in tensors if k not in used and not k.endswith("num_batches_tracked"))
    if extra:
        raise CheckpointError(f"unexpected key {extra[0]} ({len(extra)} not mapped): another "
                              "architecture or a newer timm layout?")  # fmt: skip
    return model


def _keys_for(keys: list[str], count: int) -> list[str]:
    """A key to name in an error for each Keras weight of a layer."""
    return keys if len(keys) == count else [keys[min(i // 2, len(keys) - 1)] for i in range(count)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.pretrained", description=__doc__.split("\n")[0]
    )
    p.add_argument("checkpoint", type=Path, help="timm MobileViT v1 model.safetensors")
    p.add_argument("--out", type=Path, required=True, help="the .keras file to write")
    p.add_argument("--image-size", type=int, default=256, help="input size (multiple of 32)")
    p.add_argument("--source-channels", choices=["bgr", "rgb"], default="bgr",
                   help="colour order the weights were trained on (cvnets v1: bgr)")  # fmt: skip
    args = p.parse_args(argv)
    if args.out.suffix != ".keras":
        print("error: --out must end in .keras", file=sys.stderr)
        return 2
    try:
        model = convert(read_safetensors(args.checkpoint), args.image_size, args.source_channels)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    print(f"wrote {args.out}: MobileViT-{model.name.removeprefix('mobilevit_').upper()}, "
          f"{model.output_shape[-1]} classes, {args.image_size} px, from {args.checkpoint.name} "
          f"(sha256 {sha256_file(args.checkpoint)[:12]}…)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
