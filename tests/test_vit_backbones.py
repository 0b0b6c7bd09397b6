"""DINOv2, CLIP and SigLIP in Flax against Hugging Face `transformers` with random weights, nothing downloaded.

Each reference model is built by `transformers` (the [reference] extra), every tensor randomised (LayerNorm,
LayerScale and biases too, so a transposed or swapped tensor cannot hide behind an init of ones and zeros),
saved with `save_pretrained` (the published key names and layout) and loaded by the backbone from that
`model.safetensors`. The numeric parity runs on 2-block, width-32 models so it stays fast, on real photos,
for every pooling, an intermediate block, and both resized and native positional embeddings; the real sizes
are checked key by key and shape by shape against the reference built on the meta device (no memory), and
numerically (slow) in `test_real_sizes_match_reference`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from cbir_jax.backbones import build_backbone
from cbir_jax.backbones import clip
from cbir_jax.backbones import dinov2
from cbir_jax.backbones import safetensors_weights
from cbir_jax.backbones import vit
from cbir_jax.backbones.weights import CheckpointMismatchError
from cbir_jax.core.config import BackboneConfig, preset
from cbir_jax.core.errors import ConfigError, MissingFileError

CALTECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101-dev"
TOL = 1e-4  # float32, max abs difference of a feature
FAMILIES = {"dinov2": dinov2.FAMILY, "clip": clip.CLIP, "siglip": clip.SIGLIP}


def _photos() -> list[np.ndarray]:
    from PIL import Image

    images = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()]
    for category in ("Leopards", "accordion", "butterfly"):
        path = CALTECH / category / "image_0001.jpg"
        if path.exists():
            images.append(np.asarray(Image.open(path).convert("RGB")))
    return images


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CBIR_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "vit-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach the network


# --- reference models ------------------------------------------------------------------------------------


def _hf_config(family: str, spec: vit.ViTSpec):
    """The `transformers` config of the architecture `spec` describes (whole CLIP/SigLIP model, as published)."""
    import transformers as T

    if family == "dinov2":
        common = dict(hidden_size=spec.hidden, num_hidden_layers=spec.depth, num_attention_heads=spec.heads,
                      mlp_ratio=spec.mlp // spec.hidden, patch_size=spec.patch, image_size=spec.grid * spec.patch)
        if spec.registers:
            return T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig(num_register_tokens=spec.registers, **common)
        return T.Dinov2Model, T.Dinov2Config(**common)
    vision = dict(hidden_size=spec.hidden, intermediate_size=spec.mlp, num_hidden_layers=spec.depth,
                  num_attention_heads=spec.heads, patch_size=spec.patch, image_size=spec.grid * spec.patch)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if family == "clip":
        return T.CLIPModel, T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection)
    return T.SiglipModel, T.SiglipConfig(text_config=text, vision_config=vision)


def _randomise(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            tokens = name.endswith(("position_embedding.weight", "position_embeddings", "class_embedding", "cls_token",
                                    "register_tokens", "mask_token", "probe"))
            if p.ndim >= 2 and not tokens:
                p.copy_(r / np.sqrt(np.prod(p.shape[1:])))  # matrices and convs: unit-variance outputs
            elif name.endswith("lambda1") or (name.endswith(".weight") and p.ndim == 1):
                p.copy_(1.0 + 0.2 * r)  # LayerNorm scales, LayerScale
            else:
                p.copy_(0.3 * r)  # biases, class/register tokens, positional embeddings, probe


def _reference(family: str, model: str, directory: Path, seed: int = 0):
    """A `transformers` model of `family`/`model` with random weights, and its saved model.safetensors."""
    import torch

    torch.manual_seed(seed)
    cls, config = _hf_config(family, FAMILIES[family].models[model].spec)
    net = cls(config).eval()
    _randomise(net, seed)
    net.save_pretrained(directory)
    return net, str(directory / "model.safetensors")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{(family, model): (reference module, weights file)} for the test architectures, built once."""
    pytest.importorskip("transformers")
    out = {}
    for family, model in (("dinov2", "tiny"), ("dinov2", "tiny_reg"), ("clip", "tiny"), ("siglip", "tiny")):
        out[family, model] = _reference(family, model, tmp_path_factory.mktemp(f"{family}-{model}"))
    return out


def _reference_features(family: str, net, batch: np.ndarray, spec: vit.ViTSpec, layer: int, pooling: str,
                        p: float = 3.0) -> np.ndarray:
    """The feature the backbone should give, computed from the reference's own modules."""
    import torch

    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    grid = spec.grid * spec.patch
    with torch.inference_mode():
        if family == "dinov2":
            out = net(x, output_hidden_states=True)
            tokens = net.layernorm(out.hidden_states[layer])
            if layer == spec.depth:  # the final-normed tokens are the reference's own output
                torch.testing.assert_close(tokens, out.last_hidden_state, rtol=0, atol=0)
        else:
            tower = net.vision_model
            out = tower(x, output_hidden_states=True, interpolate_pos_encoding=batch.shape[1] != grid)
            tokens = tower.post_layernorm(out.hidden_states[layer])
        if pooling == "cls":
            return tokens[:, 0].numpy()
        if pooling == "embed":
            return (net.visual_projection(out.pooler_output) if family == "clip" else out.pooler_output).numpy()
        patches = tokens[:, spec.prefix:]
        if pooling == "mean":
            return patches.mean(dim=1).numpy()
        return patches.clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p).numpy()


# Every pooling; the last and an intermediate block; positional embeddings resized (DINOv2 always is in
# use: 518 px checkpoints at 224) and native.
CASES = [
    ("dinov2", "tiny", 56, None, "cls"), ("dinov2", "tiny", 56, None, "mean"), ("dinov2", "tiny", 56, None, "gem"),
    ("dinov2", "tiny", 56, "block1", "cls"), ("dinov2", "tiny", 98, None, "mean"),
    ("dinov2", "tiny_reg", 56, None, "cls"), ("dinov2", "tiny_reg", 56, None, "mean"),
    ("dinov2", "tiny_reg", 56, "block1", "gem"), ("dinov2", "tiny_reg", 140, None, "cls"),
    ("clip", "tiny", 64, None, "embed"), ("clip", "tiny", 64, None, "cls"), ("clip", "tiny", 64, None, "mean"),
    ("clip", "tiny", 64, None, "gem"), ("clip", "tiny", 64, "block1", "cls"), ("clip", "tiny", 48, None, "embed"),
    ("siglip", "tiny", 64, None, "embed"), ("siglip", "tiny", 64, None, "mean"), ("siglip", "tiny", 64, None, "gem"),
    ("siglip", "tiny", 64, "block1", "mean"), ("siglip", "tiny", 80, None, "embed"),
]


def _cfg(family: str, model: str, size: int, layer: str | None, pooling: str, weights: str) -> BackboneConfig:
    base = preset("backbone", family, BackboneConfig)  # the shipped YAML: its resize is the reference's
    return dataclasses.replace(base, model=model, image_size=size, layer=layer, pooling=pooling, weights=weights)


def _max_diff(family, model, size, layer, pooling, tiny) -> float:
    net, path = tiny[family, model]
    backbone = build_backbone(_cfg(family, model, size, layer, pooling, path))
    batch = np.stack([backbone.preprocess(image) for image in _photos()])
    assert batch.shape[1:] == (size, size, 3)
    spec = FAMILIES[family].models[model].spec
    tap = int(layer[5:]) if layer else spec.depth
    want = _reference_features(family, net, batch, spec, tap, pooling)
    got = np.asarray(backbone.forward(batch))
    assert got.shape == want.shape == (len(batch), backbone.feature_dim) and got.dtype == np.float32
    assert np.abs(want).max() > 0.1  # a feature worth comparing (not all ~0)
    return float(np.abs(got - want).max())


@pytest.mark.reference
@pytest.mark.parametrize("family, model, size, layer, pooling", CASES)
def test_matches_reference(family, model, size, layer, pooling, tiny):
    diff = _max_diff(family, model, size, layer, pooling, tiny)
    print(f"{family} {model} {size}px layer={layer or 'last'} pooling={pooling}: max abs diff {diff:.2e}")
    assert diff < TOL


@pytest.mark.reference
@pytest.mark.parametrize("family, size, resize", [("dinov2", 224, "center_crop"), ("dinov2", 56, "center_crop"),
                                                  ("clip", 224, "center_crop"), ("siglip", 224, "squash")])
def test_preprocessing_is_the_reference_image_processors(family, size, resize):
    """Resize, crop and normalisation equal `transformers`' image processors (PIL backend) on real photos."""
    T = pytest.importorskip("transformers")
    from PIL import Image
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    spec = FAMILIES[family].models["tiny"].spec
    assert preset("backbone", family, BackboneConfig).resize == resize == spec.default_resize
    if family == "dinov2":  # facebook/dinov2-*'s preprocessor_config.json: BitImageProcessor, 256 -> 224
        proc = T.BitImageProcessorPil(size={"shortest_edge": round(size * 256 / 224)},
                                      crop_size={"height": size, "width": size},
                                      image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    elif family == "clip":
        proc = T.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:
        proc = T.SiglipImageProcessorPil(size={"height": size, "width": size})
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    for image in _photos() + [skimage.data.camera()]:  # camera: greyscale
        want = proc(images=[Image.fromarray(image)], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = vit.preprocess(image, size=size, resize=resize, ratio=spec.resize_ratio, mean=mean, std=std)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.reference
@pytest.mark.parametrize("n_in, n_out, antialias", [(7, 4, False), (7, 4, True), (37, 16, False), (37, 16, True),
                                                    (4, 5, False), (4, 10, True), (14, 14, True)])
def test_bicubic_matrix_is_torch_interpolate(n_in, n_out, antialias):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((1, 3, n_in, n_in)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out, n_out), mode="bicubic",
                                           align_corners=False, antialias=antialias).numpy()
    m = vit.torch_bicubic_matrix(n_in, n_out, antialias)
    np.testing.assert_allclose(np.einsum("ij,kl,bcjl->bcik", m, m, x), want, rtol=0, atol=1e-5)


# --- the published sizes --------------------------------------------------------------------------------


def _real_models() -> list[tuple[str, str]]:
    return [(f, m) for f, fam in FAMILIES.items() for m, entry in fam.models.items() if entry.repo]


@pytest.mark.reference
@pytest.mark.parametrize("family, model", _real_models())
def test_real_sizes_have_the_published_keys_and_shapes(family, model):
    """Each published size: the reference's saved key names and shapes are exactly what the converter reads,
    and they convert to exactly the Flax model's param tree (shapes only: the reference lives on `meta`)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.core_model_loading import revert_weight_conversion  # what save_pretrained applies

    fam = FAMILIES[family]
    spec = fam.models[model].spec
    cls, config = _hf_config(family, spec)
    with torch.device("meta"):
        net = cls(config)
    saved = revert_weight_conversion(net, net.state_dict())
    read = {fam.rename(k): tuple(v.shape) for k, v in saved.items() if fam.rename(k) is not None}
    entries = fam.entries(spec)
    assert read == {e.key: e.shape for e in entries}
    flat = {"/".join(e.path): e.convert(np.broadcast_to(np.float32(0), e.shape)).shape for e in entries}
    from flax import traverse_util

    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(vit.param_shapes(spec)).items()}
    assert flat == want


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.skipif(not os.environ.get("CBIR_JAX_REAL_SIZES"),
                    reason="3 minutes on 2 cores: set CBIR_JAX_REAL_SIZES=1 (the fast suite checks real sizes' keys and shapes)")
@pytest.mark.parametrize("family, model, pooling", [
    ("dinov2", "vits14", "cls"), ("dinov2", "vits14_reg", "mean"), ("dinov2", "vitb14", "gem"),
    ("dinov2", "vitb14_reg", "cls"), ("dinov2", "vitl14", "cls"), ("dinov2", "vitl14_reg", "cls"),
    ("clip", "vitb32", "embed"), ("clip", "vitb16", "mean"), ("clip", "vitl14", "embed"),
    ("siglip", "vitb16", "embed")])
def test_real_sizes_match_reference(family, model, pooling, tmp_path):
    """The published architectures at their real sizes and default input size, random weights."""
    pytest.importorskip("transformers")
    net, path = _reference(family, model, tmp_path)
    spec = FAMILIES[family].models[model].spec
    cfg = _cfg(family, model, 224, None, pooling, path)
    backbone = build_backbone(cfg)
    batch = np.stack([backbone.preprocess(image) for image in _photos()[:4]])
    want = _reference_features(family, net, batch, spec, spec.depth, pooling)
    diff = float(np.abs(np.asarray(backbone.forward(batch)) - want).max())
    print(f"{family} {model} 224px pooling={pooling}: max abs diff {diff:.2e}")
    assert diff < TOL


@pytest.mark.gpu
@pytest.mark.reference
@pytest.mark.parametrize("family, model, size, layer, pooling", [CASES[0], CASES[5], CASES[9], CASES[15]])
def test_matches_reference_on_gpu(family, model, size, layer, pooling, tiny):
    """The same parity on a GPU (float32, full-precision matmuls); skipped where JAX has none."""
    import jax

    if jax.default_backend() != "gpu":
        pytest.skip("no GPU: JAX runs on " + jax.default_backend())
    with jax.default_matmul_precision("highest"):
        assert _max_diff(family, model, size, layer, pooling, tiny) < TOL


# --- weights that do not fit, and files that are not there ------------------------------------------------


def _write(tensors: dict[str, np.ndarray], path: Path) -> str:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return str(path)


def _tensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


@pytest.mark.reference
def test_weights_that_do_not_fit_are_one_line_errors_naming_the_key(tiny, tmp_path):
    _, path = tiny["dinov2", "tiny"]
    sd = _tensors(path)
    cfg = _cfg("dinov2", "tiny", 56, None, "cls", path)
    build_backbone(cfg)  # exact: no error
    key = "encoder.layer.1.attention.attention.value.bias"
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != key}, rf"missing {key}; unexpected none"),
        "extra": ({**sd, "encoder.layer.2.norm1.weight": np.ones(32, np.float32)}, r"unexpected encoder\.layer\.2\.norm1\.weight"),
        "shape": ({**sd, key: np.zeros(33, np.float32)}, rf"shape mismatch {key} \(33,\) != \(32,\)"),
    }
    for name, (tensors, message) in cases.items():
        bad = _write(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointMismatchError, match=message) as info:
            build_backbone(dataclasses.replace(cfg, weights=bad))
        assert "\n" not in str(info.value), name
    # The other size's checkpoint: every block's keys differ in shape, the message names them and the model.
    _, reg = tiny["dinov2", "tiny_reg"]
    with pytest.raises(CheckpointMismatchError, match=r"does not match dinov2 tiny: .*unexpected embeddings\.register_tokens"):
        build_backbone(dataclasses.replace(cfg, weights=reg))
    _, clip_file = tiny["clip", "tiny"]
    with pytest.raises(CheckpointMismatchError, match=r"missing embeddings\.cls_token.*is it a dinov2 tiny checkpoint"):
        build_backbone(dataclasses.replace(cfg, weights=clip_file))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(path).read_bytes()[:-1000])
    with pytest.raises(safetensors_weights.WeightsFileError, match="not a readable safetensors file") as info:
        build_backbone(dataclasses.replace(cfg, weights=str(truncated)))
    assert "\n" not in str(info.value)
    not_safetensors = tmp_path / "model.pth"
    not_safetensors.write_bytes(b"PK\x03\x04 a torch zip archive, say" * 10)
    with pytest.raises(safetensors_weights.WeightsFileError, match="not a readable safetensors file") as info:
        build_backbone(dataclasses.replace(cfg, weights=str(not_safetensors)))
    assert "\n" not in str(info.value)


def test_a_missing_file_says_where_to_put_it_and_how_to_fetch_it(tmp_path, monkeypatch):
    cfg = dataclasses.replace(preset("backbone", "dinov2", BackboneConfig), weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(MissingFileError, match=r"does not exist; get DINOv2 vits14 with: hf download "
                                               r"facebook/dinov2-small model\.safetensors --revision main") as info:
        build_backbone(cfg)
    assert "\n" not in str(info.value)
    offline = dataclasses.replace(cfg, weights=None, hf_revision="0123abc")
    with pytest.raises(MissingFileError, match=r"no DINOv2 vits14 checkpoint in .*huggingface \(backbone\.hf_repo="
                                               r"facebook/dinov2-small, backbone\.hf_revision=0123abc\) and HF_HUB_OFFLINE") as info:
        build_backbone(offline, cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="test architecture with no published checkpoint"):
        build_backbone(dataclasses.replace(cfg, weights=None, model="tiny"))


@pytest.mark.reference
def test_without_weights_the_pinned_repo_is_fetched_into_cache_dir(tiny, tmp_path, monkeypatch):
    """No download happens here: the fetch is replaced, and the test checks what it was asked for."""
    _, path = tiny["siglip", "tiny"]
    asked = []

    def fake_download(repo: str, revision: str, cache_dir: str | None) -> str:
        asked.append((repo, revision, cache_dir))
        return path

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(safetensors_weights, "hub_download", fake_download)
    cfg = dataclasses.replace(preset("backbone", "siglip", BackboneConfig), model="tiny", image_size=64,
                              hf_repo="someone/siglip-tiny", hf_revision="c0ffee")
    backbone = build_backbone(cfg, cache_dir=str(tmp_path))
    assert asked == [("someone/siglip-tiny", "c0ffee", str(tmp_path))] and backbone.feature_dim == 32


@pytest.mark.reference
def test_fingerprint_names_the_weights_content_and_every_choice(tiny, tmp_path):
    _, path = tiny["clip", "tiny"]
    cfg = _cfg("clip", "tiny", 64, None, "embed", path)
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copy(path, copy)
    other = _write({k: v * 1.01 for k, v in _tensors(path).items()}, tmp_path / "other.safetensors")
    prints = [build_backbone(c).fingerprint for c in (
        cfg, dataclasses.replace(cfg, weights=str(copy)), dataclasses.replace(cfg, weights=other),
        dataclasses.replace(cfg, pooling="gem"), dataclasses.replace(cfg, pooling="gem", gem_p=4.0),
        dataclasses.replace(cfg, pooling="cls", layer="block1"), dataclasses.replace(cfg, resize="squash"),
        dataclasses.replace(cfg, image_size=48))]
    assert prints[0] == prints[1]  # the same bytes elsewhere: the same features
    assert len(set(prints)) == len(prints) - 1


@pytest.mark.reference
def test_config_errors_are_one_line(tiny):
    _, path = tiny["siglip", "tiny"]
    cfg = _cfg("siglip", "tiny", 64, None, "embed", path)
    for change, error, message in [
        (dict(pooling="cls"), ConfigError, "no class token"),
        (dict(pooling="gap"), ConfigError, "must be one of cls, mean, gem, embed"),
        (dict(layer="block1"), ConfigError, "embed needs the last block"),
        (dict(pooling="mean", layer="block3"), Exception, r"no layer 'block3'; valid: block1\.\.block2"),
        (dict(model="vitz"), Exception, "unknown siglip backbone.model 'vitz'; valid: vitb16, tiny"),
    ]:
        with pytest.raises(error, match=message) as info:
            build_backbone(dataclasses.replace(cfg, **change))
        assert "\n" not in str(info.value)


@pytest.mark.reference
def test_runtime_never_imports_torch(tiny):
    _, path = tiny["dinov2", "tiny_reg"]
    code = (
        "import sys, numpy as np, skimage.data\n"
        "from cbir_jax.backbones import build_backbone\n"
        "from cbir_jax.core.config import BackboneConfig\n"
        f"b = build_backbone(BackboneConfig(name='dinov2', model='tiny_reg', image_size=56, pooling='cls', weights={path!r}))\n"
        "b.forward(np.stack([b.preprocess(skimage.data.chelsea())])).block_until_ready()\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
