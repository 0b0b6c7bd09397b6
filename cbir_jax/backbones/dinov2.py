"""`backbone=dinov2`: Meta's DINOv2 ViT-S/14, ViT-B/14 and ViT-L/14, with or without registers, in Flax.

Weights: the official Hugging Face checkpoints (`facebook/dinov2-small`, `facebook/dinov2-with-registers-base`,
...), their `model.safetensors` read without torch (`backbones.safetensors_weights`). The architecture and the
preprocessing (short side to 256/224 of the crop, PIL bicubic, centre crop, ImageNet mean/std) are those of
`transformers`' Dinov2Model / Dinov2WithRegistersModel and their image processor; positional embeddings
(trained at 518 px) are resized to the input grid with torch's bicubic, antialiased for the register models
as in their reference. Giant (SwiGLU) is not included.
"""

from __future__ import annotations

from cbir_jax.backbones import vit
from cbir_jax.backbones.base import BACKBONES, Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _spec(hidden: int, depth: int, heads: int, registers: int = 0, patch: int = 14, grid: int = 37) -> vit.ViTSpec:
    return vit.ViTSpec(hidden=hidden, depth=depth, heads=heads, mlp=4 * hidden, patch=patch, grid=grid, act="gelu",
                     eps=1e-6, registers=registers, layerscale=True, antialias=registers > 0,
                     image_size=224, resize_ratio=256 / 224, default_resize="center_crop",
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)


MODELS: dict[str, vit.Model] = {
    "vits14": vit.Model(_spec(384, 12, 6), "facebook/dinov2-small"),
    "vitb14": vit.Model(_spec(768, 12, 12), "facebook/dinov2-base"),
    "vitl14": vit.Model(_spec(1024, 24, 16), "facebook/dinov2-large"),
    "vits14_reg": vit.Model(_spec(384, 12, 6, registers=4), "facebook/dinov2-with-registers-small"),
    "vitb14_reg": vit.Model(_spec(768, 12, 12, registers=4), "facebook/dinov2-with-registers-base"),
    "vitl14_reg": vit.Model(_spec(1024, 24, 16, registers=4), "facebook/dinov2-with-registers-large"),
    # Test architectures (2 blocks, width 32, trained at 98 px): random weights only, for fast end-to-end runs.
    "tiny": vit.Model(_spec(32, 2, 2, grid=7), None),
    "tiny_reg": vit.Model(_spec(32, 2, 2, registers=4, grid=7), None),
}


def entries(spec: vit.ViTSpec) -> list[vit.Entry]:
    """Hugging Face DINOv2 key names (as published) -> the Flax params of `vit.ViT`."""
    d, n = spec.hidden, 1 + spec.grid * spec.grid
    out = [
        vit.Entry("embeddings.cls_token", ("cls",), (1, 1, d), lambda a: a.reshape(-1)),
        vit.Entry("embeddings.position_embeddings", ("pos",), (1, n, d), lambda a: a[0]),
        *vit.patch_conv("embeddings.patch_embeddings.projection", spec, bias=True),
    ]
    if spec.registers:
        out.append(vit.Entry("embeddings.register_tokens", ("registers",), (1, spec.registers, d), lambda a: a[0]))
    for i in range(spec.depth):
        k, b = f"encoder.layer.{i}", f"block{i}"
        out += vit.norm(f"{k}.norm1", (b, "norm1"), d)
        for part in ("query", "key", "value"):
            out += vit.linear(f"{k}.attention.attention.{part}", (b, "attn", part), d, d)
        out += vit.linear(f"{k}.attention.output.dense", (b, "attn", "out"), d, d)
        out.append(vit.Entry(f"{k}.layer_scale1.lambda1", (b, "ls1"), (d,)))
        out += vit.norm(f"{k}.norm2", (b, "norm2"), d)
        out += vit.linear(f"{k}.mlp.fc1", (b, "mlp", "fc1"), d, spec.mlp)
        out += vit.linear(f"{k}.mlp.fc2", (b, "mlp", "fc2"), spec.mlp, d)
        out.append(vit.Entry(f"{k}.layer_scale2.lambda1", (b, "ls2"), (d,)))
    return out + vit.norm("layernorm", ("norm",), d)


def rename(key: str) -> str | None:
    # The mask token replaces masked patches in pre-training only; every published checkpoint carries it.
    return None if key == "embeddings.mask_token" else key


FAMILY = vit.Family(name="dinov2", title="DINOv2", models=MODELS, default="vits14", entries=entries, rename=rename)


@BACKBONES.register("dinov2")
def build(cfg, cache_dir: str | None = None) -> Backbone:
    return vit.build_family(cfg, cache_dir, FAMILY)
