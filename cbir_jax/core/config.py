"""Typed config schemas: Hydra validates every composed config against these at start-up.

A typo in a key, an override without `+`, or a value of the wrong type fails before any work is done,
with Hydra's own message. The YAML files under `cbir_jax/configs/` (linked as `configs/` at the project root) only choose values.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from cbir_jax.core.registry import UnknownComponentError
from cbir_jax.core import help_text

# Shipped inside the package, so an installed wheel composes the same configs as a source checkout
# (`configs/` at the project root is a link to this folder).
CONFIG_DIR = str(resources.files("cbir_jax") / "configs")
T = TypeVar("T")


def choice(name: str, *values: str) -> type[enum.StrEnum]:
    """A closed choice as a StrEnum whose member names are its values, so YAML and the command line write
    `features.whiten=pca` and OmegaConf rejects `pcaa` when the config is composed, before any work. A
    member compares and hashes as its string ("pca" == Whiten.pca); the modules that read a choice import
    its enum from here, so the schema is the one list of valid values."""
    return enum.StrEnum(name, {v: v for v in values})


SplitBy = choice("SplitBy", "class", "image", "none")
Resize = choice("Resize", "squash", "center_crop")
DType = choice("DType", "float32", "bfloat16", "float16")
Whiten = choice("Whiten", "none", "pca", "pca_whiten")
Storage = choice("Storage", "float32", "float16")  # features.storage: dtype of the on-disk feature store
Transform = choice("Transform", "rank", "minmax", "none")
Activation = choice("Activation", "relu", "gelu", "silu", "tanh")
HeadRerank = choice("HeadRerank", "none", "alpha_qe", "dba_alpha_qe", "diffusion")
RerankTargets = choice("RerankTargets", "supervised", "self_supervised")
RerankBase = choice("RerankBase", "fixed", "tuned")
Schedule = choice("Schedule", "cosine", "constant")
EvalOn = choice("EvalOn", "auto", "held_out", "all")
Select = choice("Select", "best", "last")
TunedBaseline = choice("TunedBaseline", "alpha_qe", "dba_alpha_qe", "diffusion", "k_reciprocal")
# The names the registries hold (losses.LOSSES, optim.OPTIMIZERS, heads.FIXED_METRICS, rerank.RERANKERS);
# tests/test_config.py checks each enum against its registry, so a new entry cannot be left out of either.
LossName = choice("LossName", "mse", "contrastive", "ranking", "listwise")
Optimizer = choice("Optimizer", "adamw", "adam", "sgd")
FixedMetric = choice("FixedMetric", "cosine", "euclid", "ssim", "ssim_ratio")
Baseline = choice("Baseline", *FixedMetric, *TunedBaseline)  # a fixed metric or a non-learned re-ranker
LoggerName = choice("LoggerName", "csv", "tensorboard", "mlflow", "wandb")  # metrics_log.LOGGERS


@dataclasses.dataclass
class SplitConfig:
    # class: heads train on some categories and are evaluated on the others (generalisation);
    # image: train/eval images drawn from every category; none: train on the gallery itself (self-supervised).
    by: SplitBy = SplitBy["class"]
    train_fraction: float = 0.5
    # None: every evaluation image is a query against all the others (leave-one-out).
    query_fraction: Optional[float] = None
    # Share of the training side held out for validation (model selection, hyper-parameters); by=class
    # takes whole training categories, by=image images of every category, by=none none (no labels).
    val_fraction: float = 0.0
    seed: int = 0


@dataclasses.dataclass
class DataConfig:
    name: str = "embedded"
    root: Optional[str] = None
    seed: int = 0
    views_per_image: int = 8  # embedded: augmented views per source photo
    max_per_class: Optional[int] = None
    tfds_split: str = "train"
    tfds_data_dir: Optional[str] = None
    # Decode processes running beside the backbone (cbir_jax/data/pipeline.py); None: one per core, 0: decode
    # in the main process (fewer than 128 images a worker always are). An image that takes longer than
    # decode_timeout_s to decode is skipped.
    workers: Optional[int] = None
    decode_timeout_s: float = 60.0
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)


@dataclasses.dataclass
class BackboneConfig:
    name: str = "pixels"
    image_size: int = 32
    resize: Resize = Resize.squash
    weights: Optional[str] = None  # a state-dict file, for backbones whose weights no package ships
    layer: Optional[str] = None  # which stage's activations become the feature; None: the last
    pooling: str = "gap"  # gap | mac | gem | rmac; vision transformers: cls | mean | gem | embed
    gem_p: float = 3.0
    rmac_levels: int = 3
    batch_size: int = 32
    dtype: DType = DType.float32
    # Vision transformers (dinov2, clip, siglip): the size (e.g. vits14, vitb32), and the Hugging Face repo and
    # revision whose model.safetensors is fetched once into cache_dir when `weights` is unset (null: the model's).
    model: Optional[str] = None
    hf_repo: Optional[str] = None
    hf_revision: Optional[str] = None


@dataclasses.dataclass
class FeaturesConfig:
    """Post-processing of backbone features, fitted on the gallery (no labels involved)."""

    l2_normalize: bool = True
    whiten: Whiten = Whiten.none
    whiten_dim: Optional[int] = None
    cache: bool = True
    # The on-disk feature store (cbir_jax/features/store.py): dtype of the stored features (float16 halves
    # the disk and page cache; recall@10 in benchmarks/results), rows per shard, and an explicit folder
    # (None: one under cache_dir per data source and backbone).
    storage: Storage = Storage.float32
    shard_rows: int = 4096
    store: Optional[str] = None
    # python -m cbir_jax.extract on many processes (docs/scale.md): jax.distributed.initialize() with these
    # (None: detected from SLURM / Open MPI); a process that does not reach a barrier in time fails the rest.
    distributed: bool = False
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    barrier_timeout_s: float = 600.0


@dataclasses.dataclass
class LabelsConfig:
    name: str = "ssim_ratio"
    image_size: int = 64  # side of the thumbnails SSIM and dHash are computed on
    grayscale: bool = True  # SSIM on luma, as usual; 3x cheaper than on RGB
    ssim_win_size: int = 7
    hash_size: int = 8
    # Targets of ratio heuristics are heavy-tailed; `rank` maps them to [0, 1] by their quantile.
    transform: Transform = Transform.rank
    # Apply the transform within each anchor's candidates (pairs.per_anchor > 0): ranking is per query.
    per_query: bool = False
    eps: float = 1e-3
    # labels=rerank: the non-learned re-ranker whose similarities on the training rows are the targets.
    reranker: str = "dba_alpha_qe"


@dataclasses.dataclass
class PairsConfig:
    pairs_per_epoch: int = 20000
    hard_fraction: float = 0.5  # share of difficult pairs: feature-space neighbours
    hard_k: int = 20  # neighbours a difficult pair is drawn from
    # > 0: pairs come in groups of one anchor and `per_anchor` candidates (needed by labels.per_query and
    # loss=listwise); 0: independent pairs (the seed).
    per_anchor: int = 0


@dataclasses.dataclass(unsafe_hash=True)  # hashable: the jitted re-ranker takes it as a static argument
class LearnedRerankConfig:
    """`head=learned_rerank`: DBA + alpha-QE whose neighbour weights a transformer learns (learned_rerank.py).

    The one description of the re-ranker: its shape and non-learned parts (k, alphas, sides), saved in
    `model.json`, and its training (targets, episodes, temperature). Never changed after it is built.
    """

    k: int = 50  # neighbours per item, database side and query side
    alpha: float = 3.0  # base DBA weights max(cos, 0)^alpha, corrected by the model
    qe_k: int = 15
    qe_alpha: float = 1.0
    dim: int = 64
    depth: int = 2
    heads: int = 4
    query_side: bool = True  # learned expansion of the query over its neighbours (False: the raw query)
    database_side: bool = True  # learned weights for the gallery's DBA vectors (False: DBA's own)
    targets: RerankTargets = RerankTargets.supervised  # same class | DBA + alpha-QE pseudo-labels
    pseudo_positives: int = 20  # self_supervised: nearest rows counted relevant
    queries_per_step: int = 128  # each step: this many training rows are queries, the rest the gallery
    temperature: float = 0.05
    val_every: int = 5  # epochs between validation MAP@R measurements
    # fixed: k, alpha, qe_k, qe_alpha as set above; tuned: those of DBA + alpha-QE grid-searched on the
    # validation rows (cbir_jax/evaluation/tuning.py), so the model starts from the best non-learned re-ranker.
    base: RerankBase = RerankBase.fixed


@dataclasses.dataclass
class HeadConfig:
    name: str = "mlp"
    hidden: list[int] = dataclasses.field(default_factory=lambda: [512])
    activation: Activation = Activation.relu
    rank: int = 128  # cosine_residual: rank of the learned correction x + B(A x)
    rerank: HeadRerank = HeadRerank.none  # cosine_residual: a re-ranker on the learned embedding
    reranker: LearnedRerankConfig = dataclasses.field(default_factory=LearnedRerankConfig)
    # mlp / simnet: a fixed metric `base` plus a zero-initialised learned correction (starts *at* the metric).
    # false: the seed's architecture.
    residual: bool = False
    base: FixedMetric = FixedMetric.cosine
    # mlp: all weights >= 0, output negated, so a larger (q - g)^2 never raises the score (relu or tanh).
    monotone: bool = False
    # CSLS hubness correction: subtract each gallery item's mean similarity to its csls_k nearest gallery
    # neighbours (0: off). Applies to whatever the head scores (cbir_jax/scoring/hubness.py).
    csls_k: int = 0


@dataclasses.dataclass
class LossConfig:
    name: LossName = LossName.mse
    margin: float = 0.5
    temperature: float = 0.1  # listwise: softmax temperature of targets and scores


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 256
    optimizer: Optimizer = Optimizer.adamw
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 50
    grad_clip: Optional[float] = 1.0
    log_every: int = 20
    checkpoint_every: int = 200  # steps; a checkpoint is also written at the end of every epoch
    max_to_keep: int = 2
    resume: bool = False
    evaluate: bool = True  # evaluate on the held-out split when training ends
    # Early stopping: stop after this many validations (one per epoch) without a new best; null: never.
    # Needs validation rows (data.split.val_fraction > 0).
    patience: Optional[int] = None
    diagnose: bool = False  # write diagnostics.json + diagnostics.png (cbir_jax/diagnose.py) after training


@dataclasses.dataclass
class EvalConfig:
    # auto: the held-out split of the training run when evaluating a checkpoint on its own data,
    # otherwise every image (each a query against all the others). held_out | all force one.
    on: EvalOn = EvalOn.auto
    k: int = 10
    query_chunk: int = 256
    # Most gallery rows scored per step; null: chosen from N, the query batch and the cache
    # (`ranking.chunk_rows`), so a gallery whose scores fit in 32 MiB is scored in one step, read in place.
    gallery_chunk: Optional[int] = None
    # Fixed metrics and non-learned re-rankers compared with the trained head in every table.
    baselines: list[Baseline] = dataclasses.field(
        default_factory=lambda: [Baseline.euclid, Baseline.cosine, Baseline.ssim, Baseline.ssim_ratio]
    )
    figure: bool = True
    # Which checkpoint of a trained run is evaluated: best (best validation MAP@R; the last one where the
    # run had no validation rows) | last.
    select: Select = Select.best
    # Re-rankers shown once more at parameters grid-searched on the validation rows (data.split.val_fraction;
    # cbir_jax/evaluation/tuning.py), e.g. [dba_alpha_qe, diffusion]: the fair baseline for a learned scorer.
    tuned_baselines: list[TunedBaseline] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ServeConfig:
    """`python -m cbir_jax.serve`: the search page."""

    host: str = "127.0.0.1"  # loopback: nobody else on the network can reach the page unless told to
    port: int = 8000
    # Scorers shown side by side, after the checkpoint's head when one is given: fixed metrics or re-rankers.
    scorers: list[Baseline] = dataclasses.field(default_factory=lambda: [Baseline.cosine, Baseline.dba_alpha_qe])
    max_upload_bytes: int = 8 * 2**20
    max_pixels: int = 36_000_000  # larger uploads are refused before decoding (a decompression bomb)


@dataclasses.dataclass
class LoggerConfig:
    """`logger=csv|tensorboard|mlflow|wandb` (configs/logger/): where training curves go besides metrics.jsonl,
    which every run writes. mlflow and wandb need the [loggers] extra; neither needs a network."""

    name: LoggerName = LoggerName.tensorboard
    # mlflow: the experiment; wandb: the project.
    project: str = "cbir_jax"
    # mlflow: the tracking store. The default is a local SQLite file (MLflow's own file store is deprecated
    # and refuses new use); `mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db` shows it.
    tracking_uri: str = "sqlite:///outputs/mlflow.db"
    # wandb: offline writes RUN/wandb/ (`wandb sync RUN/wandb/offline-run-*` uploads it later); online needs a login.
    mode: str = "offline"


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    features: FeaturesConfig = dataclasses.field(default_factory=FeaturesConfig)
    labels: LabelsConfig = dataclasses.field(default_factory=LabelsConfig)
    pairs: PairsConfig = dataclasses.field(default_factory=PairsConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    serve: ServeConfig = dataclasses.field(default_factory=ServeConfig)
    logger: LoggerConfig = dataclasses.field(default_factory=LoggerConfig)
    seed: int = 0
    # Features, converted weights and tuning results; `$CBIR_JAX_CACHE` or ~/.cache/cbir_jax unless set.
    cache_dir: str = "${cbir_jax.default_cache_dir:}"
    # evaluate / search: a training run directory whose checkpoint and saved config are used.
    checkpoint: Optional[str] = None
    query: Optional[str] = None
    k: int = 10
    # index: the folder a persistent index is written to, or updated in place (cbir_jax/api/store.py).
    out: Optional[str] = None
    # index: also write a trained faiss index of the gallery (`index_factory` string, e.g. IVF1024,PQ32).
    faiss: Optional[str] = None
    # search / serve: a saved index to rank against instead of extracting the gallery (`data` is not read);
    # `index_root`: its images folder, when that lies outside the index's own folder (trusted only if given);
    # `index_memory`: auto | ram | stream, how its gallery is ranked (cbir_jax/api/index.py: Index).
    index: Optional[str] = None
    index_root: Optional[str] = None
    index_memory: str = "auto"
    # The metric `train` returns for a Hydra sweeper to optimise (hparams_search/): the trained scorer's value.
    optimized_metric: str = "map_at_r"
    experiment: Any = None


def default_cache_dir() -> str:
    """The one place the cache folder's default is decided (the schema's `cache_dir` resolves to it)."""
    return os.environ.get("CBIR_JAX_CACHE") or "~/.cache/cbir_jax"


# Where a command reading a trained run writes: under that run, so its evaluations and searches stay with it.
RUN_SUBDIRS = {"evaluate": "eval", "search": "search", "diagnose": "diagnose", "index": "index"}
# Where each command writes otherwise: outputs/<folder>/<date>/<time>/, so outputs/runs/ holds training runs only.
OUTPUT_DIRS = {"train": "runs", "evaluate": "eval", "search": "search", "index": "index", "diagnose": "diagnose",
               "serve": "serve"}


def run_dir_for(job: str, checkpoint: Optional[str], stamp: str) -> str:
    """`hydra.run.dir` (configs/config.yaml): `<checkpoint>/eval/<date>_<time>` for `evaluate checkpoint=RUN`
    (search, diagnose and index likewise), else `outputs/<command's folder>/<date>/<time>` (OUTPUT_DIRS)."""
    name = help_text.entry_point(job)
    if checkpoint and name in RUN_SUBDIRS:
        return str(Path(checkpoint) / RUN_SUBDIRS[name] / stamp.replace("/", "_"))
    return f"outputs/{OUTPUT_DIRS.get(name, 'runs')}/{stamp}"


def preset(group: str, name: str, schema: type[T]) -> T:
    """The typed config that `group=name` on a command line composes (`configs/<group>/<name>.yaml` over
    the schema's defaults), for Python callers that never compose a Hydra config (the `cbir_jax.Index` API).
    """
    options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    if name not in options:
        raise UnknownComponentError(f"unknown {group} {name!r}; valid: {', '.join(options)}")
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(Path(CONFIG_DIR) / group / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def register_configs() -> None:
    """Registers the schema that `configs/config.yaml` extends, the resolver its run folder uses, and those
    of `--help` (configs/hydra/help/cbir_jax.yaml: each entry point's own description)."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    OmegaConf.register_new_resolver("cbir_jax.run_dir", run_dir_for, replace=True)
    OmegaConf.register_new_resolver("cbir_jax.default_cache_dir", default_cache_dir, replace=True)
    OmegaConf.register_new_resolver("cbir_jax.command", help_text.command, replace=True)
    OmegaConf.register_new_resolver("cbir_jax.description", help_text.description, replace=True)


register_configs()
