"""`python -m cbir_jax.serve [checkpoint=RUN_DIR] [data=folder data.root=DIR | index=FILE] [serve.port=8000]`

Prepares the gallery once (features, the head, every scorer's state, compiled ranking), then serves the
search page on `serve.host` (loopback by default) and prints its URL. Needs the [serve] extra.

Examples:
  python -m cbir_jax.serve                                           # the embedded photos
  python -m cbir_jax.serve checkpoint=outputs/runs/<date>/<time> data=folder data.root=DIR
  python -m cbir_jax.serve serve.port=8080 'serve.scorers=[cosine,diffusion]'
  python -m cbir_jax.serve index=photos.index                        # a saved index: nothing re-extracted
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from cbir_jax.runs.cli import print_outputs, run_dir, run_or_exit
from cbir_jax.core.config import CONFIG_DIR


def serve(cfg_dict: DictConfig, overridden: frozenset[str]) -> None:
    from cbir_jax.runs.cli import to_typed
    from cbir_jax.serve import server
    from cbir_jax.serve.app import create_app
    from cbir_jax.serve.gallery import prepare_gallery

    limits = to_typed(cfg_dict).serve
    sock = server.bind(limits.host, limits.port)  # before the slow part: a taken port fails at once
    gallery = prepare_gallery(cfg_dict, overridden)
    app = create_app(gallery, limits)
    print(f"search page: {server.url_of(sock)}  ({gallery.name}, {len(gallery)} images, "
          f"scorers: {', '.join(gallery.scorers)}; Ctrl+C stops it)", flush=True)
    print_outputs(run_dir())  # the command's config and log
    server.run(app, sock)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from cbir_jax.runs.cli import overridden_keys

    run_or_exit(lambda: serve(cfg, overridden_keys()))


if __name__ == "__main__":
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"error: the search page needs the [serve] extra ({e.name} is missing): pip install -e '.[serve]'", file=sys.stderr)
        sys.exit(2)
    if not any(arg.startswith("hydra.job.name=") for arg in sys.argv):
        sys.argv.append("hydra.job.name=serve")  # not `__main__`: the log is serve.log, as each command's is
    main()
