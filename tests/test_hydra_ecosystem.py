"""The Hydra plugins users expect: an Optuna search (configs/hparams_search/), a parallel local launcher and a
SLURM launcher (configs/hydra/launcher/). They come with the [sweep] extra; without it these tests skip.

Each config composes with Hydra's compose API and holds what docs/sweeps.md says it does; one slow test runs
a real two-trial search end to end.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cbir_jax.core.config import CONFIG_DIR

NEEDS = "the [sweep] extra (pip install -e '.[sweep]')"
SEARCH = "mlp_optuna"
# The search space of configs/hparams_search/mlp_optuna.yaml, as docs/sweeps.md lists it.
SEARCHED = {"train.learning_rate", "train.weight_decay", "head.hidden", "pairs.hard_fraction"}
TINY = [
    "backbone=pixels",
    "backbone.image_size=16",
    "data.views_per_image=4",
    "pairs.pairs_per_epoch=500",
    "train.batch_size=64",
    "train.epochs=1",
    "train.warmup_steps=2",
    "labels.image_size=32",
]


def search_override(name: str = SEARCH) -> str:
    """`hparams_search=NAME` where configs/config.yaml lists the group (`- hparams_search: null`), else `+`."""
    defaults = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "config.yaml").defaults)
    listed = any(isinstance(d, dict) and "hparams_search" in d for d in defaults)
    return f"{'' if listed else '+'}hparams_search={name}"


def compose_all(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_optuna_search_maximises_the_returned_metric():
    config = pytest.importorskip("hydra_plugins.hydra_optuna_sweeper.config", reason=f"hydra-optuna-sweeper: {NEEDS}")
    cfg = compose_all(search_override())
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == config.OptunaSweeperConf._target_
    assert sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val_map_at_r"  # what cbir_jax.train returns: results[head.name][optimized_metric]
    assert cfg.head.name == "mlp" and cfg.train.evaluate  # a trial that did not evaluate would return nothing
    assert sweeper.sampler._target_ == config.TPESamplerConfig._target_
    assert isinstance(sweeper.sampler.seed, int)  # the same trials on every run
    assert 0 < sweeper.n_trials <= 50 and sweeper.n_jobs == 1
    assert set(sweeper.params) == SEARCHED
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"  # trial number = folder


def test_search_space_names_real_keys_and_values_the_schema_accepts():
    """Every bound and choice of the search space, applied as the sweeper applies it, composes and type-checks."""
    impl = pytest.importorskip("hydra_plugins.hydra_optuna_sweeper._impl", reason=f"hydra-optuna-sweeper: {NEEDS}")
    params = compose_all(search_override()).hydra.sweeper.params
    space, fixed = impl.create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    assert set(space) == SEARCHED and not fixed
    for key, dist in space.items():
        values = dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)
        for value in values:
            # The trial's override is f"{key}={value}" (the sweeper's _configure_trials); the schema types it.
            cfg = compose_all(search_override(), f"{key}={value}")
            assert str(OmegaConf.select(cfg, key)).replace(" ", "") == str(value).replace(" ", "")
    assert compose_all(search_override(), "head.hidden=[256,256]").head.hidden == [256, 256]


def test_command_line_overrides_win_over_the_search_config():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=f"hydra-optuna-sweeper: {NEEDS}")
    cfg = compose_all(search_override(), "head=mlp_seed", "hydra.sweeper.n_trials=3", "optimized_metric=map")
    assert (cfg.head.name, cfg.head.residual, cfg.hydra.sweeper.n_trials, cfg.optimized_metric) == ("mlp", False, 3, "map")


def test_local_parallel_launcher():
    config = pytest.importorskip("hydra_plugins.hydra_joblib_launcher.config", reason=f"hydra-joblib-launcher: {NEEDS}")
    launcher = compose_all("hydra/launcher=local_parallel").hydra.launcher
    assert launcher._target_ == config.JobLibLauncherConf._target_
    assert launcher.n_jobs == 2 and launcher.prefer == "processes"
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=f"hydra-optuna-sweeper: {NEEDS}")
    both = compose_all(search_override(), "hydra/launcher=local_parallel", "hydra.sweeper.n_jobs=2")
    assert both.hydra.launcher._target_ == config.JobLibLauncherConf._target_ and both.hydra.sweeper.n_jobs == 2


def test_slurm_launcher_resolves_its_partition_from_the_environment(monkeypatch):
    config = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config", reason=f"hydra-submitit-launcher: {NEEDS}")
    monkeypatch.delenv("SBATCH_PARTITION", raising=False)
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    launcher = compose_all("hydra/launcher=slurm").hydra.launcher
    assert launcher._target_ == config.SlurmQueueConf._target_
    assert (launcher.timeout_min, launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == (120, 1, 8, 32)
    assert launcher.partition is None and launcher.account is None  # sbatch's own defaults
    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    assert compose_all("hydra/launcher=slurm").hydra.launcher.partition == "gpu"


def test_slurm_launcher_writes_the_sbatch_script_we_document(monkeypatch, tmp_path):
    """The launcher's settings pass submitit's own checks and become these #SBATCH lines (no cluster needed)."""
    config = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config", reason=f"hydra-submitit-launcher: {NEEDS}")
    submitit = pytest.importorskip("submitit", reason=NEEDS)
    # submitit's SLURM executor only looks for `srun` on PATH when it is created; nothing is submitted.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    cfg = compose_all("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.partition=gpu")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    # As SlurmLauncher.launch does: the executor gets the folder and max_num_timeout, then every other setting,
    # the shared ones as they are and the SLURM-specific ones prefixed with slurm_.
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    shared = set(OmegaConf.structured(config.BaseQueueConf).keys())
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m cbir_jax.train", "uid")
    for line in ["--time=120", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB", "--partition=gpu",
                 "--ntasks-per-node=1", "--nodes=1"]:
        assert f"#SBATCH {line}\n" in script


@pytest.mark.slow
def test_two_trial_search_end_to_end(tmp_path):
    """A real Optuna search of 2 trials, run in parallel by the joblib launcher, on the embedded photos."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=f"hydra-optuna-sweeper: {NEEDS}")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason=f"hydra-joblib-launcher: {NEEDS}")
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "cbir_jax.train", "-m", search_override(), "hydra.sweeper.n_trials=2",
         "hydra/launcher=local_parallel", "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={sweep}", *TINY],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and set(results["best_params"]) == SEARCHED
    best = results["best_value"]
    assert isinstance(best, float) and 0.0 <= best <= 1.0
    # What the sweeper maximised is each trial's validation MAP@R, never its held-out table.
    scored = [json.loads((sweep / str(n) / "validation.json").read_text())["mlp"]["val_map_at_r"] for n in range(2)]
    assert best == pytest.approx(max(scored))
    assert "Best value" in out.stderr or "Best value" in out.stdout
