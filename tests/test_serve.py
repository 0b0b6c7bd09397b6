"""The search page's engine and HTTP surface: answers, path traversal, uploads that must be refused.

Served by real uvicorn on loopback (raw requests through http.client, so `../` reaches the server
unnormalised) over a tiny labelled folder whose answers are known: one image is stored twice.
"""

from __future__ import annotations

import http.client
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")

from cbir_jax.runs.cli import to_typed  # noqa: E402
from cbir_jax.serve import server  # noqa: E402
from cbir_jax.serve.app import create_app  # noqa: E402
from cbir_jax.serve.gallery import prepare_gallery, search_row  # noqa: E402
from helpers import compose_config  # noqa: E402

CANARY = b"TOP-SECRET-CANARY"
MAX_UPLOAD = 200_000


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _photo_crops() -> list[np.ndarray]:
    from skimage import data

    out = []
    for photo in (data.astronaut(), data.coffee(), data.chelsea()):
        for i in range(3):
            out.append(np.ascontiguousarray(photo[40 * i : 40 * i + 96, 30 * i : 30 * i + 96]))
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A labelled folder (3 classes x 3 crops, plus one crop stored twice), symlinks out of its root,
    and a secret file beside it; served in the background."""
    base = tmp_path_factory.mktemp("serve")
    root, outside = base / "gallery", base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(CANARY)
    (outside / "secret.png").write_bytes(_png(np.full((40, 40, 3), (255, 0, 255), np.uint8)))
    crops = _photo_crops()
    for c, name in enumerate(("astronaut", "coffee", "cat")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(_png(crops[3 * c + i]))
    (root / "cat" / "0_copy.png").write_bytes((root / "cat" / "0.png").read_bytes())
    os.symlink(outside / "secret.png", root / "cat" / "link.png")
    os.symlink(outside, root / "coffee" / "linked_dir")
    cfg = compose_config("data=folder", f"data.root={root}", "serve.scorers=[cosine,dba_alpha_qe]")
    limits = to_typed(cfg).serve
    limits.max_upload_bytes = MAX_UPLOAD
    limits.max_pixels = 4_000_000
    gallery = prepare_gallery(cfg)
    with server.in_background(create_app(gallery, limits)) as url:
        yield {"gallery": gallery, "url": url, "root": root}


def _get(url: str, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """A raw request: the path is sent exactly as given (no client-side normalisation)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheader("content-type", ""), r.read()
    finally:
        conn.close()


def _json(url: str, path: str, **kw) -> tuple[int, dict]:
    import json

    status, _, body = _get(url, path, **kw)
    return status, json.loads(body)


def test_symlinks_out_of_the_root_are_not_in_the_gallery(site):
    ids = site["gallery"].ids
    assert len(ids) == 10, ids  # 9 crops + the copy; neither link.png nor linked_dir/*
    assert not any("link" in i for i in ids)
    status, body = _json(site["url"], "/api/gallery?limit=200")
    assert status == 200 and body["size"] == 10 and [it["id"] for it in body["items"]] == ids


def test_a_gallery_query_finds_its_duplicate_first_and_never_itself(site):
    gallery = site["gallery"]
    row = gallery.ids.index(os.path.join("cat", "0.png"))
    twin = gallery.ids.index(os.path.join("cat", "0_copy.png"))
    status, body = _json(site["url"], f"/api/search/{row}")
    assert status == 200 and body["query"]["row"] == row
    assert [r["scorer"] for r in body["results"]] == ["cosine", "dba_alpha_qe"]
    labels = gallery.labels
    for column in body["results"]:
        hits = column["hits"]
        assert len(hits) == len(gallery) - 1  # k=10 but only 9 others: padding is never shown
        assert row not in [h["row"] for h in hits]
        assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
        assert all(h["relevant"] == bool(labels[h["row"]] == labels[row]) for h in hits)
        assert column["ms"] > 0
    cosine = body["results"][0]["hits"]
    assert cosine[0]["row"] == twin and cosine[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [h["score"] for h in cosine] == sorted((h["score"] for h in cosine), reverse=True)


def test_an_uploaded_gallery_image_ranks_itself_first(site):
    gallery = site["gallery"]
    row = gallery.ids.index(os.path.join("coffee", "1.png"))
    data = (site["root"] / "coffee" / "1.png").read_bytes()
    status, body = _json(site["url"], "/api/search", method="POST", body=data)
    assert status == 200 and body["query"]["row"] is None
    top = body["results"][0]["hits"][0]
    assert top["row"] == row and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert all(h["relevant"] is None for c in body["results"] for h in c["hits"])  # no label for an upload


def test_k_and_the_scorers_are_chosen_per_request(site):
    gallery = site["gallery"]
    status, info = _json(site["url"], "/api/gallery")
    assert info["max_k"] == len(gallery) and set(info["meanings"]) == {"cosine", "dba_alpha_qe"}
    _, every = _json(site["url"], "/api/search/4")
    status, body = _json(site["url"], "/api/search/4?k=3&scorers=cosine")
    assert status == 200 and body["k"] == 3 and [c["scorer"] for c in body["results"]] == ["cosine"]
    assert [h["row"] for h in body["results"][0]["hits"]] == [h["row"] for h in every["results"][0]["hits"][:3]]
    assert "cosine similarity" in body["results"][0]["meaning"]
    status, body = _json(site["url"], "/api/search/4?k=2&scorers=dba_alpha_qe,cosine")
    assert [c["scorer"] for c in body["results"]] == ["dba_alpha_qe", "cosine"]  # the order asked for
    assert [len(c["hits"]) for c in body["results"]] == [2, 2]
    data = (site["root"] / "coffee" / "1.png").read_bytes()
    status, body = _json(site["url"], "/api/search?k=1&scorers=dba_alpha_qe", method="POST", body=data)
    assert status == 200 and [len(c["hits"]) for c in body["results"]] == [1]


@pytest.mark.parametrize("query, message", [
    ("k=0", "k=0: must be between 1 and 10"),
    ("k=11", "k=11: must be between 1 and 10"),  # the gallery has 10 images
    ("k=-1", "k='-1': must be a whole number"),
    ("k=abc", "k='abc': must be a whole number"),
    ("k=99999999999999", "k=999999999...: must be between 1 and 10"),
    ("scorers=diffusion", "unknown scorer 'diffusion'; this page has: cosine, dba_alpha_qe"),
    ("scorers=cosine,..%2Fsecret", "unknown scorer '../secret'; this page has: cosine, dba_alpha_qe"),
])
def test_a_bad_k_or_scorer_is_refused_with_one_line_not_ignored(site, query, message):
    for method, path, body in (("GET", f"/api/search/0?{query}", None), ("POST", f"/api/search?{query}", b"x")):
        status, reply = _json(site["url"], path, method=method, body=body)
        assert (status, reply["detail"]) == (400, message)


def test_the_engine_ranks_without_the_web_layer(site):
    ranked = search_row(site["gallery"], 0)
    assert [r.scorer for r in ranked] == ["cosine", "dba_alpha_qe"]
    assert all(0 not in r.rows and np.all(np.diff(r.scores) <= 0) for r in ranked)


def test_images_are_served_by_row_only(site):
    status, ctype, body = _get(site["url"], "/image/0?full=true")
    assert status == 200 and ctype == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (96, 96)
    status, _, body = _get(site["url"], "/image/0")
    assert status == 200 and max(Image.open(io.BytesIO(body)).size) <= 192


@pytest.mark.parametrize(
    "path",
    [
        "/image/../../outside/secret.txt",
        "/image/..%2F..%2Foutside%2Fsecret.txt",
        "/image/%2e%2e%2f%2e%2e%2foutside%2fsecret.txt",
        "/image/%252e%252e%252foutside%252fsecret.txt",
        "/image/..%5c..%5coutside%5csecret.txt",
        "/image/%c0%ae%c0%ae%c0%afsecret.txt",
        "/image//etc/passwd",
        "/image/%2Fetc%2Fpasswd",
        "/image/-1",
        "/image/10",
        "/image/99999999999999999999",
        "/image/0x1",
        "/image/cat%2Flink.png",
        "/image/cat/link.png",
        "/static/../gallery.py",
        "/static/..%2Fgallery.py",
        "/static/%2e%2e%2fgallery.py",
        "/static/%2e%2e/__init__.py",
        "/static/..%5Capp.py",
        "/static//etc/passwd",
        "/static/%2Fetc%2Fpasswd",
        "/static/index.html",
        "/../../outside/secret.txt",
        "/%2e%2e/%2e%2e/outside/secret.txt",
        "/cbir_jax/serve/app.py",
        "/docs",
        "/openapi.json",
    ],
)
def test_path_traversal_is_refused(site, path):
    status, _, body = _get(site["url"], path)
    assert status in (400, 404, 422), (path, status)
    assert CANARY not in body and b"import" not in body and b"root:" not in body


def test_a_client_supplied_path_is_ignored(site):
    secret = site["root"].parent / "outside" / "secret.png"
    status, _, body = _get(site["url"], f"/image/0?path={secret}&file={secret}")
    assert status == 200 and body == _get(site["url"], "/image/0")[2]


def test_own_assets_are_served(site):
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        status, ctype, body = _get(site["url"], path)
        assert status == 200 and ctype.startswith(kind) and body


def _bomb_png(side: int) -> bytes:
    """A complete 1-bit PNG of side x side zeros: a few KB that would decode to side² pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo_crops()[0]).save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize(
    "name, body, status, message",
    [
        ("text", b"hello, not an image\n" * 10, 400, "not a readable image"),
        ("truncated", _truncated_jpeg(), 400, "truncated"),
        ("bomb over the page's pixel limit", _bomb_png(4_000), 413, "4000x4000 pixels"),
        ("bomb over PIL's own limit", _bomb_png(16_000), 400, "DecompressionBombError"),
        ("empty", b"", 400, "empty"),
        ("too large", b"\0" * (MAX_UPLOAD + 1), 413, "limit"),
    ],
)
def test_bad_uploads_get_a_clear_message_and_the_server_keeps_serving(site, name, body, status, message):
    got, reply = _json(site["url"], "/api/search", method="POST", body=body)
    assert got == status, (name, reply)
    assert message in reply["detail"] and "BytesIO" not in reply["detail"]
    assert _json(site["url"], "/api/search/0")[0] == 200


def test_an_undeclared_oversized_upload_is_cut_off(site):
    """Chunked transfer (no Content-Length): the limit is enforced while reading."""
    parts = urlsplit(site["url"])
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/api/search", body=iter([b"\0" * 65536] * 8), encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and b"limit" in r.read()
    conn.close()
    assert _json(site["url"], "/api/search/0")[0] == 200


def test_an_unknown_scorer_fails_when_the_config_is_composed():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):  # serve.scorers is a list of the schema's Baseline enum
        compose_config("data.views_per_image=1", "serve.scorers=[cosin]")


def test_a_taken_port_is_a_one_line_error():
    sock = server.bind("127.0.0.1", 0)
    try:
        with pytest.raises(server.ServeError, match="cannot listen"):
            server.bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


@pytest.mark.slow
def test_one_command_starts_the_page_on_loopback(tmp_path):
    """`python -m cbir_jax.serve` prints a loopback URL that answers (the embedded set, pixels: fast)."""
    project = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "cbir_jax.serve", "backbone=pixels", "backbone.image_size=16",
           "data.views_per_image=2", "serve.port=0", f"hydra.run.dir={tmp_path}"]
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("search page: "):
                break
        assert line.startswith("search page: "), f"the page did not start: {log.read_text()[-2000:]}"
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:")
        assert proc.stdout.readline().startswith(f"outputs: {tmp_path}/ (.hydra/, serve.log")
        status, body = _json(url, "/api/gallery")
        assert status == 200 and body["size"] == 42 and body["scorers"] == ["cosine", "dba_alpha_qe"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_checkpoint_puts_its_head_first_and_ranks_as_the_head_scores(tmp_path):
    """`checkpoint=RUN`: the trained head is a column, and its top-k equals scoring every pair one by one."""
    import jax
    import jax.numpy as jnp
    from omegaconf import OmegaConf

    from cbir_jax.training import checkpointing
    from cbir_jax.scoring import heads, scorers
    from cbir_jax.train import train

    run = tmp_path / "run"
    cfg = compose_config("train.evaluate=false", "data.views_per_image=2")
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what Hydra writes for a real run
    train(to_typed(cfg), run)
    gallery = prepare_gallery(compose_config(f"checkpoint={run}", "data.views_per_image=2", "serve.scorers=[cosine]"))
    assert list(gallery.scorers) == ["mlp", "cosine"]
    ranked = search_row(gallery, 3)[0]
    module = heads.build_head(to_typed(cfg).head)
    like = heads.init_params(module, gallery.features.shape[1], jax.random.key(0))
    params = checkpointing.restore_params(run, like, checkpointing.resolve(run, "best"))  # what serve loads
    pairwise = scorers.pair_scorer("mlp", module, params, fast=False)  # one MLP application per pair
    rows, shared = pairwise.prepare(jnp.asarray(gallery.features))
    every = np.array(pairwise.score(rows, shared, jnp.asarray(gallery.features[3:4]), jnp.asarray([3])))[0]
    every[3] = -np.inf
    order = np.argsort(-every, kind="stable")[: gallery.k]
    np.testing.assert_allclose(ranked.scores, every[order], rtol=1e-4, atol=1e-5)
    assert set(ranked.rows.tolist()) == set(order.tolist())


def test_a_saved_index_is_served_without_extracting_again(site, tmp_path, monkeypatch):
    """`serve index=FILE`: the index's features, post-processing and scorer (first), then serve.scorers; symlinks
    out of its folder stay unserved; nothing goes through the feature-extraction stage."""
    import cbir_jax
    from cbir_jax.api import IndexFileError
    from cbir_jax.core.errors import ConfigError

    index = cbir_jax.Index.build("pixels", site["root"], scorer="euclid")
    path = index.save(tmp_path / "gallery.index")
    monkeypatch.setattr("cbir_jax.api.index.load_stage", lambda *a, **k: pytest.fail("features extracted again"))
    with pytest.raises(IndexFileError, match="outside the index's folder"):  # a root elsewhere is trusted only if given
        prepare_gallery(compose_config(f"index={path}"))
    served = prepare_gallery(compose_config(f"index={path}", f"index_root={site['root']}", "index_memory=stream",
                                            "serve.scorers=[cosine,dba_alpha_qe]"))
    assert list(served.scorers) == ["euclid", "cosine", "dba_alpha_qe"]
    assert sorted(served.ids) == sorted(p for p in index.paths if "link" not in p) and len(served) == 10
    rows = [index.paths.index(i) for i in served.ids]
    np.testing.assert_allclose(served.features, index.gallery()[rows], atol=1e-6)
    row, twin = served.ids.index("cat/0.png"), served.ids.index("cat/0_copy.png")
    euclid = search_row(served, row)[0]
    assert euclid.scorer == "euclid" and euclid.rows[0] == twin and row not in euclid.rows
    assert served.label_name(row) == "cat" and served.load(row).shape == (96, 96, 3)
    with pytest.raises(ConfigError, match="drop data="):
        prepare_gallery(compose_config(f"index={path}", "data=folder", f"data.root={site['root']}"), frozenset({"data"}))
