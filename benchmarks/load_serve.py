"""A bounded load test of the search page on loopback: `python -m benchmarks.load_serve [-- OVERRIDES...]`

Starts `python -m cbir_jax.serve OVERRIDES serve.host=127.0.0.1 serve.port=0` as a subprocess, sends
`--requests` requests (default 1,000), `--concurrency` at a time (default 16), mixing gallery-id queries
(GET /api/search/{row}) and uploads (POST /api/search with a JPEG of a gallery image, so every upload
costs one backbone forward pass), after `--warmup` untimed requests. Reports p50/p95/p99 latency per
kind and overall, throughput and the error count (any non-200 or failed request), and writes them to
benchmarks/results/serve-<date>.md (or `--out`). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PROJECT = Path(__file__).resolve().parents[1]


def start_server(overrides: list[str], timeout_s: float) -> tuple[subprocess.Popen, str, str]:
    """The page in a subprocess on a free loopback port; returns (process, URL, its start-up line)."""
    cmd = [sys.executable, "-m", "cbir_jax.serve", *overrides, "serve.host=127.0.0.1", "serve.port=0"]
    proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        if line.startswith("search page: "):
            return proc, line.split()[2], line.strip()
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"error: the page did not start within {timeout_s:.0f} s: {' '.join(cmd)}")


def plan(n: int, size: int, upload_share: float, n_uploads: int, seed: int) -> list[tuple[str, int]]:
    """A fixed, shuffled mix: ("row", gallery row) or ("upload", index of an upload payload)."""
    rng = np.random.default_rng(seed)
    n_up = round(n * upload_share)
    jobs = [("upload", int(i)) for i in rng.integers(0, n_uploads, n_up)]
    jobs += [("row", int(r)) for r in rng.integers(0, size, n - n_up)]
    order = rng.permutation(len(jobs))
    return [jobs[i] for i in order]


async def fire(url: str, jobs: list[tuple[str, int]], uploads: list[bytes], concurrency: int, timeout_s: float):
    """Runs the jobs `concurrency` at a time; returns [(kind, seconds, ok, status or error, ranking ms)]
    where ranking ms is the server's own time for all scorers' top-k (the rest is HTTP, JSON, queueing
    and, for an upload, decoding and the backbone)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    out: list[tuple[str, float, bool, str, float]] = []
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:

        async def worker():
            while not queue.empty():
                kind, arg = queue.get_nowait()
                start = time.perf_counter()
                try:
                    if kind == "row":
                        r = await client.get(f"/api/search/{arg}")
                    else:
                        r = await client.post("/api/search", content=uploads[arg])
                    body = r.json()
                    ok = r.status_code == 200 and len(body["results"]) > 0
                    what, ranking_ms = str(r.status_code), sum(c["ms"] for c in body.get("results", []))
                except httpx.HTTPError as e:
                    ok, what, ranking_ms = False, type(e).__name__, float("nan")
                out.append((kind, time.perf_counter() - start, ok, what, ranking_ms))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def summarise(results, wall_s: float) -> list[str]:
    rows = ["| requests | n | errors | p50 ms | p95 ms | p99 ms | max ms | server ranking ms, p50 / p99 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in ("row", "upload", "all"):
        sel = [r for r in results if kind == "all" or r[0] == kind]
        if not sel:
            continue
        ms = np.asarray([r[1] for r in sel]) * 1e3
        errors = sum(not r[2] for r in sel)
        name = {"row": "gallery-id query", "upload": "upload", "all": "all"}[kind]
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        r50, r99 = np.nanpercentile([r[4] for r in sel], [50, 99])
        rows.append(f"| {name} | {len(sel)} | {errors} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {ms.max():.1f} | {r50:.2f} / {r99:.2f} |")
    rows.append("")
    rows.append(f"Throughput: {len(results) / wall_s:.1f} requests/s ({len(results)} in {wall_s:.1f} s).")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--upload-share", type=float, default=0.25)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=100, help="requests one at a time, reported apart")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds for the page to start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides for cbir_jax.serve (after --)")
    args = parser.parse_args(argv)

    import fastapi
    import httpx
    import uvicorn

    from benchmarks.run import machine

    started = time.perf_counter()
    proc, url, banner = start_server(args.overrides, args.start_timeout)
    start_s = time.perf_counter() - started
    try:
        info = httpx.get(url + "api/gallery?limit=1", timeout=30).json()
        size = info["size"]
        payload_rows = np.random.default_rng(args.seed).choice(size, min(8, size), replace=False)
        uploads = [httpx.get(f"{url}image/{int(r)}?full=true", timeout=30).content for r in payload_rows]
        warm = plan(args.warmup, size, args.upload_share, len(uploads), args.seed + 1)
        asyncio.run(fire(url, warm, uploads, args.concurrency, args.timeout))
        jobs = plan(args.requests, size, args.upload_share, len(uploads), args.seed)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        results = asyncio.run(fire(url, jobs, uploads, args.concurrency, args.timeout))
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        one = plan(args.sequential, size, args.upload_share, len(uploads), args.seed + 2)
        t1 = time.perf_counter()
        single = asyncio.run(fire(url, one, uploads, 1, args.timeout)) if one else []
        single_wall = time.perf_counter() - t1
    finally:
        proc.terminate()
        proc.wait(30)

    errors = sum(not r[2] for r in results + single)
    failures = sorted({r[3] for r in results + single if not r[2]})
    today = datetime.date.today().isoformat()
    command = "python -m benchmarks.load_serve" + (" -- " + " ".join(args.overrides) if args.overrides else "")
    lines = [
        f"## `{command}`",
        "",
        f"Machine: {machine()}; fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}, httpx {httpx.__version__}. "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after the run (other jobs share the cores).",
        "",
        f"Command: `{command}` (server and load generator on the same machine, 127.0.0.1).",
        "",
        f"Page: {banner.removeprefix('search page: ')}; started (features, scorers prepared, compiled) in {start_s:.1f} s.",
        "",
        f"Load: {args.requests} requests, {args.concurrency} concurrent, {args.upload_share:.0%} uploads "
        f"(JPEGs of {len(uploads)} gallery images, {min(map(len, uploads)):,}-{max(map(len, uploads)):,} bytes; each "
        f"one backbone forward pass), the rest gallery-id queries; after {args.warmup} untimed warm-up requests. "
        "Latency is client-side, from sending the request to the parsed JSON answer.",
        "",
        f"### {args.concurrency} at a time",
        "",
        *summarise(results, wall),
        "",
        *([f"### One at a time (then {args.sequential} more requests, same mix: latency without queueing)", "",
           *summarise(single, single_wall), ""] if single else []),
        f"Errors: {errors}" + (f" ({', '.join(failures)})" if failures else "") + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or RESULTS / f"serve-{today}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Each run is a section; runs of several page configurations on one day share the file.
    before = out.read_text() + "\n" if out.exists() else f"# Search page under load, {today}\n\n"
    out.write_text(before + text)
    print(f"written: {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
