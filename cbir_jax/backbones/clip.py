"""`backbone=clip` (OpenAI CLIP ViT-B/32, ViT-B/16, ViT-L/14 image towers) and `backbone=siglip` (Google's
SigLIP ViT-B/16 at 224 px), in Flax.

Weights: the official Hugging Face checkpoints (`openai/clip-vit-base-patch32`, `google/siglip-base-patch16-224`,
...): the whole model's `model.safetensors`, of which only the image tower (`vision_model.*`, and CLIP's
`visual_projection`) is read, without torch. Architecture and preprocessing follow `transformers`'
CLIPVisionModelWithProjection / SiglipVisionModel and their image processors: CLIP resizes the short side to
the crop size with PIL bicubic, centre-crops and uses OpenAI's mean/std; SigLIP squashes to the square with
PIL bicubic and scales to [-1, 1]. `backbone.pooling=embed` is each model's own image embedding (CLIP's
projected class token, SigLIP's attention-pooling head): the vector zero-shot retrieval indexes.
"""

from __future__ import annotations

from cbir_jax.backbones import vit
from cbir_jax.backbones.base import BACKBONES, Backbone

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Tensors of the published models that are not part of the image tower: never read.
_OTHER_PARTS = ("text_model.", "text_projection.", "logit_scale", "logit_bias")


def _clip(hidden: int, depth: int, heads: int, patch: int, grid: int, projection: int, mlp: int | None = None) -> vit.ViTSpec:
    return vit.ViTSpec(hidden=hidden, depth=depth, heads=heads, mlp=mlp or 4 * hidden, patch=patch, grid=grid,
                     act="quick_gelu", eps=1e-5, pre_norm=True, patch_bias=False, projection=projection,
                     image_size=patch * grid, resize_ratio=1.0, default_resize="center_crop", mean=CLIP_MEAN, std=CLIP_STD)


def _siglip(hidden: int, depth: int, heads: int, patch: int, grid: int, mlp: int) -> vit.ViTSpec:
    return vit.ViTSpec(hidden=hidden, depth=depth, heads=heads, mlp=mlp, patch=patch, grid=grid, act="gelu_tanh",
                     eps=1e-6, cls_token=False, map_head=True, image_size=patch * grid, default_resize="squash",
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


CLIP_MODELS: dict[str, vit.Model] = {
    "vitb32": vit.Model(_clip(768, 12, 12, 32, 7, 512), "openai/clip-vit-base-patch32"),
    "vitb16": vit.Model(_clip(768, 12, 12, 16, 14, 512), "openai/clip-vit-base-patch16"),
    "vitl14": vit.Model(_clip(1024, 24, 16, 14, 16, 768), "openai/clip-vit-large-patch14"),
    "tiny": vit.Model(_clip(32, 2, 2, 16, 4, 16, mlp=64), None),  # test architecture: random weights only
}
SIGLIP_MODELS: dict[str, vit.Model] = {
    "vitb16": vit.Model(_siglip(768, 12, 12, 16, 14, 3072), "google/siglip-base-patch16-224"),
    "tiny": vit.Model(_siglip(32, 2, 2, 16, 4, 64), None),  # test architecture: random weights only
}


def _blocks(spec: vit.ViTSpec) -> list[vit.Entry]:
    d, out = spec.hidden, []
    for i in range(spec.depth):
        k, b = f"encoder.layers.{i}", f"block{i}"
        out += vit.norm(f"{k}.layer_norm1", (b, "norm1"), d)
        for part, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
            out += vit.linear(f"{k}.self_attn.{name}", (b, "attn", part), d, d)
        out += vit.norm(f"{k}.layer_norm2", (b, "norm2"), d)
        out += vit.linear(f"{k}.mlp.fc1", (b, "mlp", "fc1"), d, spec.mlp)
        out += vit.linear(f"{k}.mlp.fc2", (b, "mlp", "fc2"), spec.mlp, d)
    return out


def clip_entries(spec: vit.ViTSpec) -> list[vit.Entry]:
    """CLIP's image-tower key names (without the `vision_model.` prefix) -> the Flax params of `vit.ViT`."""
    d = spec.hidden
    return [
        vit.Entry("embeddings.class_embedding", ("cls",), (d,)),
        vit.Entry("embeddings.position_embedding.weight", ("pos",), (1 + spec.grid**2, d)),
        *vit.patch_conv("embeddings.patch_embedding", spec, bias=False),
        *vit.norm("pre_layrnorm", ("pre_norm",), d),  # sic: the published name
        *_blocks(spec),
        *vit.norm("post_layernorm", ("norm",), d),
        *vit.linear("visual_projection", ("projection",), d, spec.projection, bias=False),
    ]


def siglip_entries(spec: vit.ViTSpec) -> list[vit.Entry]:
    """SigLIP's image-tower key names (without the `vision_model.` prefix) -> the Flax params of `vit.ViT`."""
    d = spec.hidden
    return [
        vit.Entry("embeddings.position_embedding.weight", ("pos",), (spec.grid**2, d)),
        *vit.patch_conv("embeddings.patch_embedding", spec, bias=True),
        *_blocks(spec),
        *vit.norm("post_layernorm", ("norm",), d),
        vit.Entry("head.probe", ("head", "probe"), (1, 1, d)),
        *vit.packed_attention("head.attention", ("head", "attn"), d),
        *vit.norm("head.layernorm", ("head", "norm"), d),
        *vit.linear("head.mlp.fc1", ("head", "mlp", "fc1"), d, spec.mlp),
        *vit.linear("head.mlp.fc2", ("head", "mlp", "fc2"), spec.mlp, d),
    ]


def rename(key: str) -> str | None:
    """Whole-model and image-tower-only files alike: drop the `vision_model.` prefix, skip the other parts
    and the `position_ids` buffer that older exports carry."""
    if key.startswith(_OTHER_PARTS) or key.endswith("position_ids"):
        return None
    return key.removeprefix("vision_model.")


CLIP = vit.Family(name="clip", title="CLIP", models=CLIP_MODELS, default="vitb32", entries=clip_entries, rename=rename)
SIGLIP = vit.Family(name="siglip", title="SigLIP", models=SIGLIP_MODELS, default="vitb16", entries=siglip_entries, rename=rename)


@BACKBONES.register("clip")
def build_clip(cfg, cache_dir: str | None = None) -> Backbone:
    return vit.build_family(cfg, cache_dir, CLIP)


@BACKBONES.register("siglip")
def build_siglip(cfg, cache_dir: str | None = None) -> Backbone:
    return vit.build_family(cfg, cache_dir, SIGLIP)
