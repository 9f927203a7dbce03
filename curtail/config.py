"""Typed experiment configuration: traces, curtailment rules, sites, execution model, training,
policies, sweeps, runs.

A policy's parameters and their defaults live only here, one model per kind
(:data:`PolicyConfig`; the kinds: :data:`POLICY_KINDS`); ``curtail.planning`` builds each
policy from its model.

Every config is a frozen pydantic model with ``extra="forbid"``: a typo'd or renamed key is an
error that names the key, never a silent default. Configs are TOML files (``experiments/*.toml``)
or Python objects built in a notebook; both go through :func:`load_experiment` /
:class:`ExperimentConfig` validation.

Units are in the field names: ``_s`` seconds, ``_w`` watts, ``_g_per_kwh`` grams CO2 per kWh.
Instants are tz-aware datetimes (TOML offset date-times, e.g. ``2026-01-11T17:00:00Z``).
"""

from __future__ import annotations

import difflib
import tomllib
from datetime import datetime
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or object is invalid; the message names the file, the key and the fix."""


class StrictModel(BaseModel):
    # inf or NaN in a duration, power, budget or throughput is always a typo (TOML reads `inf`)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like a config file (``model_copy`` is not: it would
        take a negative budget or a misspelt key). Raises :class:`ConfigError` naming the key.

        Example::

            faster = config.replace(token_budget=6e9, training=config.training.replace(preset="tiny"))
        """
        try:
            return type(self).model_validate({**self.model_dump(exclude_unset=True), **changes})  # keeps what was set
        except ValidationError as error:
            raise ConfigError(_format_validation_error(error, f"{type(self).__name__}.replace()", type(self))) from None


# --------------------------------------------------------------------------------------------
# Traces


class TraceSource(StrictModel):
    """One CSV of carbon intensity: a time column plus one column per region.

    Covers the wide paper trace (``point_time,CAISO_NORTH,SPP_TX,...``), single-region files
    (``time,Caiso_North``) and average-CI files (``Time,Carbon Intensity``; rename the value
    column to a region with ``columns``).
    """

    path: Path
    signal: Literal["marginal", "average"] = "marginal"
    unit: Literal["g_per_kwh", "lbs_per_mwh"] = "g_per_kwh"
    naive_timezone: str | None = Field(
        default=None,
        description="IANA zone of naive timestamps (e.g. 'UTC'); required if the file has no offsets",
    )
    time_column: str | None = Field(default=None, description="default: the first column")
    columns: dict[str, str] = Field(
        default_factory=dict, description="source column -> region name; other columns keep their name"
    )
    max_gap_s: float = Field(default=3600.0, gt=0, description="longest allowed gap between samples")


class ForecastSource(StrictModel):
    """A WattTime-style forecast CSV: ``request_time, forecast_time, <value column>``."""

    path: Path
    region: str
    unit: Literal["g_per_kwh", "lbs_per_mwh"] = "g_per_kwh"
    naive_timezone: str | None = None


# --------------------------------------------------------------------------------------------
# Rules, sites, execution


class CurtailmentRules(StrictModel):
    """When a site counts as curtailed, and how the calendar enters and leaves windows.

    Defaults are the prior system's: curtailed below 100 gCO2/kWh, enter at the first sample
    below, leave only after the signal stayed above for at least 600 s (a sample at or below
    the threshold cancels the countdown), 240 s from the provisioning decision to a ready node,
    signal polled every 10 s.

    Average-CI traces have no "curtailed" level: ``threshold_kind = "percentile"`` calls a
    sample curtailed when it is below the ``threshold_percentile``-th percentile of the
    samples in the trailing ``percentile_window_s`` (itself included), computed causally, so
    the calendar, the policies and the in-window accounting all use the same definition.
    """

    threshold_g_per_kwh: float = Field(default=100.0, ge=0)
    hysteresis_s: float = Field(default=600.0, ge=0)
    provisioning_s: float = Field(default=240.0, ge=0)
    poll_s: float = Field(default=10.0, gt=0)
    threshold_kind: Literal["absolute", "percentile"] = Field(
        default="absolute",
        description=(
            "absolute: curtailed below threshold_g_per_kwh (marginal signals); percentile: "
            "curtailed below the threshold_percentile of the trailing percentile_window_s "
            "(average-CI traces, which have no curtailment level of their own)"
        ),
    )
    threshold_percentile: float = Field(default=20.0, gt=0, lt=100)
    percentile_window_s: float = Field(default=7 * 86400.0, gt=0)


class SiteConfig(StrictModel):
    """A site: a GPU cluster in one grid region, its power draw and training throughput.

    Power is given per site (``training_power_w``/``idle_power_w``) or per GPU
    (``training_power_per_gpu_w``/``idle_power_per_gpu_w`` times ``num_gpus``), not both: the
    IT equipment's draw. ``pue`` (power usage effectiveness: the facility's draw over its IT
    equipment's) scales it to what the grid supplies; every energy and emissions figure, and
    every policy that weighs them, uses the scaled power (:attr:`site_training_power_w`).
    """

    region: str
    num_gpus: int = Field(default=4, ge=1)
    training_power_w: float | None = Field(default=None, gt=0)
    idle_power_w: float | None = Field(default=None, ge=0)
    training_power_per_gpu_w: float | None = Field(default=None, gt=0)
    idle_power_per_gpu_w: float | None = Field(default=None, ge=0)
    tokens_per_s: float = Field(gt=0, description="site training throughput, all its GPUs")
    pue: float = Field(default=1.0, ge=1.0, le=3.0,
                       description="power usage effectiveness: facility watts per IT watt (1.0: IT power only)")
    link_mbit_per_s: float | None = Field(
        default=None, gt=0, description="this site's link to the averager (default: execution.link_mbit_per_s)"
    )
    link_latency_ms: float | None = Field(
        default=None, ge=0, description="one-way latency of this site's link (default: execution.link_latency_ms)"
    )

    @model_validator(mode="after")
    def _one_power_spec(self) -> SiteConfig:
        per_site = self.training_power_w is not None or self.idle_power_w is not None
        per_gpu = self.training_power_per_gpu_w is not None or self.idle_power_per_gpu_w is not None
        if per_site and per_gpu:
            raise ValueError(
                "give power per site (training_power_w, idle_power_w) or per GPU "
                "(training_power_per_gpu_w, idle_power_per_gpu_w), not both"
            )
        if not per_site and not per_gpu:
            raise ValueError("set training_power_w and idle_power_w (or the _per_gpu_w pair)")
        pair = (
            (self.training_power_w, self.idle_power_w)
            if per_site
            else (self.training_power_per_gpu_w, self.idle_power_per_gpu_w)
        )
        if None in pair:
            raise ValueError("training and idle power must both be set")
        return self

    @property
    def site_training_power_w(self) -> float:
        """The grid's watts while the site trains: IT power times ``pue``."""
        if self.training_power_w is not None:
            return self.training_power_w * self.pue
        assert self.training_power_per_gpu_w is not None
        return self.training_power_per_gpu_w * self.num_gpus * self.pue

    @property
    def site_idle_power_w(self) -> float:
        """The grid's watts while the site is provisioned but not training: IT power times ``pue``."""
        if self.idle_power_w is not None:
            return self.idle_power_w * self.pue
        assert self.idle_power_per_gpu_w is not None
        return self.idle_power_per_gpu_w * self.num_gpus * self.pue


class ExecutionConfig(StrictModel):
    """How training executes once a site is ready: rounds, overheads, joins.

    The simulator replays exactly this model; the Ray runtime measures the real values.
    ``round_restart_s`` and ``join = "next_round"`` describe the prior system (worker respawn
    every round, a site ready mid-round waits); curtail's persistent worker groups use 0 and
    ``"immediate"``.
    """

    round_s: float = Field(default=600.0, gt=0, description="wall time of a federated round's local phase")
    sync_s: float = Field(default=5.0, ge=0, description="per-sync pause of each participating site")
    group_start_s: float = Field(default=30.0, ge=0, description="worker-group start after a node is ready")
    round_restart_s: float = Field(default=0.0, ge=0, description="lost at the start of every round")
    join: Literal["immediate", "next_round"] = "immediate"
    sync_mb_sent: float = Field(
        default=0.0, ge=0, description="megabytes each site sends per sync (its pseudo-gradient on the wire)"
    )
    sync_mb_received: float = Field(
        default=0.0, ge=0, description="megabytes each site receives per sync (the global weights)"
    )
    link_mbit_per_s: float | None = Field(
        default=None, gt=0, description="every site's link to the averager (a site's own overrides it); "
        "None: transfers add nothing to sync_s"
    )
    link_latency_ms: float = Field(default=0.0, ge=0, description="one-way latency of that link")
    overlap_sync: bool = Field(
        default=False, description="members keep training while their sync is in flight and apply the merged "
        "weights when they arrive (curtail.runtime.streaming); transfers longer than round_s still pause them"
    )

    @model_validator(mode="after")
    def _restart_fits_round(self) -> ExecutionConfig:
        if self.round_restart_s >= self.round_s:
            raise ValueError(
                f"round_restart_s ({self.round_restart_s}) must be shorter than round_s ({self.round_s})"
            )
        return self


class TrainingConfig(StrictModel):
    """What a real run trains and how the Ray runtime lays it out (``curtail run`` only).

    Clock: with ``clock = "virtual"`` every optimizer step at a site advances that site's time
    by ``tokens_per_step / site.tokens_per_s`` (the hardware the site represents), so a trace of
    hours replays in minutes, deterministically. ``clock = "realtime"`` follows the wall clock,
    ``realtime_speedup`` times faster than the trace.
    """

    preset: Literal["tiny", "small", "d12", "d20", "d48"] = "small"
    corpus: list[Path] = Field(default_factory=lambda: [Path("data/text/tinyshakespeare.txt")], min_length=1)
    heldout: list[Path] | None = Field(default=None, description="default: the last heldout_fraction of corpus")
    heldout_fraction: float = Field(default=0.05, gt=0, lt=1)
    vocab_size: int = Field(default=2048, ge=257)
    corpus_shards: str | None = Field(
        default=None,
        description="a token shard folder (a path or a pyarrow.fs URI) written by `curtail prepare-data`: read "
        "lazily by the sites, with its own tokenizer and held-out part, instead of tokenizing corpus at the start",
    )
    batch_size: int = Field(default=8, ge=1, description="sequences per worker per optimizer step")
    seq_len: int | None = Field(default=None, ge=8, description="default: the preset's")
    peak_lr: float = Field(default=3e-3, gt=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    warmdown_fraction: float = Field(default=0.3, ge=0, lt=1)
    final_lr_fraction: float = Field(default=0.1, ge=0, le=1)
    outer_optimizer: Literal["nesterov", "average"] = Field(
        default="average",
        description="average: the token-weighted mean of the sites' weights (lr 1, no momentum), the outer step that "
        "ended with the lowest held-out loss at every round length measured (11 to 114 inner steps, the CPU demo to "
        "d12 on 100M tokens: docs/BENCHMARKS.md); nesterov: DiLoCo's, with outer_lr and outer_momentum",
    )
    outer_lr: float = Field(default=0.7, gt=0, description="the Nesterov outer learning rate (DiLoCo's 0.7)")
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] | Literal["auto"] = Field(
        default="auto",
        description="the Nesterov outer momentum, or auto: set from the inner steps per round, 0.9·H/(H + 10) "
        "(curtail.training.averaging.outer_momentum_for; H from round_s and the sites' tokens_per_s)",
    )
    outer_momentum_at_handoff: Literal["keep", "reset"] = Field(
        default="keep",
        description="whenever a single site's weights become the global state (its periodic syncs, and when another "
        "site joins or it leaves): keep the outer momentum of the last federated phase, or reset it to zero, so the "
        "next federated phase does not push along a direction from before the single-site training",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="inside a site: ddp (every worker holds the whole model) or fsdp (each worker holds a dim-0 shard "
        "of every parameter, its gradients and AdamW moments, and talks to the averager for its rows only)",
    )
    activation_checkpointing: bool = Field(
        default=False, description="recompute each layer's activations in the backward pass (less memory, more compute)"
    )
    fp8_linear: bool = Field(
        default=False,
        description="train the decoder blocks' linear layers in float8 (torchao, dynamic per-tensor scaling; fp32 "
        "master weights): faster steps on Hopper-class GPUs; needs pip install 'curtail[fp8]'",
    )
    fp8_recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = Field(
        default="tensorwise",
        description="float8 scaling (torchao's recipes): one scale per tensor (fastest), per row (more accurate), "
        "or per row with the weight gradient in high precision",
    )
    averager_shards: int = Field(
        default=1, ge=1,
        description="split the global weights, their broadcast view and the outer-optimizer state across this "
        "many averaging actors (equal shares of the parameters; the same result as one, bit for bit)",
    )
    averager_resource: str | None = Field(
        default=None, min_length=1,
        description="each averaging actor asks for one unit of this custom resource, so the actors run on the nodes "
        "that declare it (ray start --resources '{\"averager\": 1}': one actor per unit; a local cluster declares "
        "them); default: beside the driver",
    )
    sync_fragments: int = Field(
        default=1, ge=1,
        description="sync the model in this many fragments at staggered points of the round (Streaming DiLoCo; "
        "needs [execution] overlap_sync): fragment p leaves p/N of a round after the sync, each fragment has its "
        "own averaging actor (averager_shards, if set, must equal it)",
    )
    transfer_dtype: Literal["bf16", "fp32", "int8", "int4"] = Field(
        default="bf16", description="pseudo-gradient codec on the wire (int8/int4: blockwise quantised, zstd-coded)"
    )
    transfer_topk_fraction: float | None = Field(
        default=None, gt=0, le=1, description="send only this share of each tensor's largest-magnitude values"
    )
    transfer_block_size: int = Field(default=128, ge=2, multiple_of=2, description="values per int8/int4 scale")
    transfer_topk_chunk: int | None = Field(
        default=None, ge=1, description="top-k per chunk of this many values (SparseLoCo's chunk-wise top-k)"
    )
    broadcast_dtype: Literal["fp32", "bf16", "int8", "int4"] = Field(
        default="fp32",
        description="the global weights' changes down to the sites (fp32: the exact weights; else the packed change)",
    )
    error_feedback: bool = Field(
        default=True, description="carry what a lossy transfer did not send into the site's next round"
    )
    error_feedback_decay: float = Field(
        default=1.0, gt=0, le=1, description="damp the carried residual by this factor each round (SparseLoCo's β)"
    )
    emulate_link: bool = Field(
        default=False,
        description="hold every transfer of a real run for its time on the site's link (bandwidth, latency): emulation",
    )
    workers_per_site: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=0.5, ge=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    torch_threads_per_worker: int = Field(default=1, ge=1)
    eval_batches: int = Field(default=8, ge=1)
    eval_batch_size: int = Field(default=8, ge=1)
    eval_gpus: float = Field(
        default=0.0, ge=0, le=1,
        description="share of a GPU on the driver's node for the evaluator (> 0: it scores on that GPU; 0: on CPUs)",
    )
    clock: Literal["virtual", "realtime"] = "virtual"
    realtime_speedup: float = Field(default=1.0, gt=0)
    cache_dir: Path = Field(default=Path(".cache"), description="tokenizer and token arrays (reused across runs)")
    command_timeout_s: float = Field(default=600.0, gt=0, description="longest wait for one site command")
    capacity_timeout_s: float = Field(
        default=1800.0, gt=0, description="longest wait for a site's nodes and worker group when its window "
        "opens (an autoscaler launching nodes takes minutes); then the site fails as a site_failure event and "
        "the run goes on without it (docs/DEPLOYMENT.md)",
    )
    report_interval_s: float = Field(
        default=10.0, ge=0, description="report each site's progress to Ray Train (its dashboard view) at most "
        "this often (wall seconds; 0: after every train command — each report waits for Train's controller)",
    )
    autoscaled_sites: bool = Field(
        default=False,
        description="site nodes come from the cluster's autoscaler (min 0): not required up when a run "
        "starts; a site whose nodes never come fails its worker group's start (docs/DEPLOYMENT.md)",
    )
    site_pinning: Literal["resources", "labels"] = Field(
        default="resources",
        description="how a site's workers find its nodes: its custom resource site_<name> (any Ray, any "
        "autoscaler, one-node local clusters) or its node label site=<name> (Ray >= 2.49; autoscaling from "
        "zero by label needs autoscaler v2, Ray >= 2.50); docs/DEPLOYMENT.md",
    )
    compile_model: bool = Field(default=False, description="torch.compile the model and loss (GPUs; docs/GPU.md)")
    micro_batch_size: int | None = Field(
        default=None, ge=1, description="rows per forward/backward; batch_size is accumulated (default: batch_size)"
    )
    power: Literal["model", "measured"] = Field(
        default="model",
        description="training power in the accounting: the sites' configured watts, or NVML-measured GPU watts "
        "(per GPU, times the site's num_gpus); falls back to the model, with a warning, where NVML is missing",
    )
    host_power: Literal["off", "codecarbon"] = Field(
        default="off",
        description="also measure the site workers' CPU and memory watts with CodeCarbon (each worker its own "
        "process's share: RAPL where readable, else CodeCarbon's TDP-and-load and memory models) and add them to "
        "the sites' training power in the accounting and emissions.csv; needs pip install 'curtail[host-power]'",
    )
    checkpoint_interval_s: float = Field(
        default=600.0, gt=0,
        description="single-site mode: deliver the site's weights and checkpoint the run at least this often "
        "(seconds of the run's clock); federated runs checkpoint at every sync",
    )
    checkpoint_inner_optimizer: bool = Field(
        default=True,
        description="save every running site's inner AdamW state with each run checkpoint, so a resume "
        "continues it (costs 8 bytes per parameter per rank on disk at each sync: off for large models)",
    )


    @model_validator(mode="after")
    def _fragments_are_the_averager_shards(self) -> TrainingConfig:
        if self.sync_fragments > 1 and self.averager_shards not in (1, self.sync_fragments):
            raise ValueError(
                f"sync_fragments = {self.sync_fragments} gives each fragment its own averaging actor, so "
                f"averager_shards = {self.averager_shards} must be 1 or {self.sync_fragments}"
            )
        return self

    @property
    def averager_actors(self) -> int:
        """How many averaging actors hold the global state (a fragment each when fragments are staggered)."""
        return max(self.averager_shards, self.sync_fragments)
    @model_validator(mode="after")
    def _one_corpus(self) -> TrainingConfig:
        fields = type(self).model_fields  # values, not model_fields_set: a dumped config is validated again
        given = [key for key in ("corpus", "heldout", "heldout_fraction", "vocab_size")
                 if getattr(self, key) != fields[key].get_default(call_default_factory=True)]
        if self.corpus_shards is not None and given:
            raise ValueError(f"corpus_shards brings its own tokens, tokenizer and held-out part: leave out "
                             f"{', '.join(given)} (set them for `curtail prepare-data` instead)")
        return self

    @model_validator(mode="after")
    def _topk_chunk_needs_topk(self) -> TrainingConfig:
        if self.transfer_topk_chunk is not None and self.transfer_topk_fraction is None:
            raise ValueError("transfer_topk_chunk needs transfer_topk_fraction (the share of each chunk to send)")
        return self

    @model_validator(mode="after")
    def _phases_fit(self) -> TrainingConfig:
        if self.warmup_fraction + self.warmdown_fraction > 1:
            raise ValueError("warmup_fraction + warmdown_fraction must be at most 1")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must divide batch_size ({self.batch_size})"
            )
        return self


# --------------------------------------------------------------------------------------------
# Policies (discriminated by `kind`)


class ThresholdPolicyConfig(StrictModel):
    """The prior system's rule: train whenever the calendar says the site is curtailed."""

    kind: Literal["threshold"] = "threshold"


class AlwaysOnPolicyConfig(StrictModel):
    """Ignore the grid: every site trains from the start (centralized / always-on baselines)."""

    kind: Literal["always_on"] = "always_on"


ForecastChoice = Literal["auto", "recorded", "synthetic", "none"]


class ForecastParams(StrictModel):
    """What a forecast-reading policy sees and how it acts on it (curtail.planning.forecast_policy)."""

    forecast: ForecastChoice = Field(
        default="auto",
        description="recorded forecasts where the experiment has them, else synthetic (auto); or none",
    )
    forecast_seed: int = Field(default=0, description="seed of synthetic forecasts")
    forecast_horizon_s: float = Field(
        default=3900.0, gt=0, description="reach of synthetic forecasts (recorded WattTime: 65 min)"
    )
    forecast_error_scale: float = Field(
        default=1.0,
        ge=0,
        description="multiplies every error of synthetic forecasts (wrong-side chances, level bias and "
        "spread; dimensionless): 1 = the error model calibrated on WattTime's recorded CAISO forecasts, "
        "0 = perfect forecasts over the horizon; recorded forecasts are used as recorded",
    )
    lead_s: float = Field(default=0.0, ge=0, description="extra pre-provisioning beyond provisioning + group start")
    min_window_s: float = Field(default=0.0, ge=0, description="least predicted training time worth a start")
    bridge_s: float = Field(default=1800.0, ge=0, description="idle through predicted gaps shorter than this")
    hold_s: float = Field(default=600.0, ge=0, description="keep nodes this long after a window closes")
    seasonal_s: float = Field(
        default=0.0, ge=0, description="also expect openings seen this long ago (86400: daily); 0 = off"
    )
    forecast_margin_g_per_kwh: float = Field(
        default=0.0, ge=0, description="read forecasts below threshold + margin as an opening (they miss most)"
    )
    history_s: float = Field(
        default=7 * 86400.0, gt=0, description="past whose windows (and window time) set expectations"
    )


class ForecastPolicyConfig(ForecastParams):
    """Pre-provision from honest forecasts so sites are ready as windows open; skip short
    windows; idle through short gaps instead of flapping."""

    kind: Literal["forecast"] = "forecast"


class BudgetPolicyConfig(ForecastParams):
    """Spend the token budget in the cleanest windows: train where carbon per token is below a
    price (the emissions / completion-time knob), keep pace, never miss a makeable deadline."""

    kind: Literal["budget"] = "budget"
    max_ci_g_per_kwh: float = Field(
        default=60.0, ge=0, description="price: dirtiest intensity trained at while on schedule (most efficient site)"
    )
    pace_fraction: float = Field(
        default=0.0, ge=0, le=1, description="relax the price to the threshold when behind this share of a linear schedule"
    )
    supply_margin: float = Field(
        default=0.0, ge=0, description="raise the price until the past's supply below it covers this × the rest (0 = off)"
    )
    recent_s: float = Field(default=86400.0, ge=0, description="supply from the leaner of history_s and this (0 = off)")
    deadline_guard: bool = Field(default=True, description="run every site when the budget can only just be met")
    guard_margin: float = Field(default=0.1, ge=0, lt=1)
    hold_s: float = Field(default=0.0, ge=0, description="keep nodes this long after the price is crossed")


class MpcPolicyConfig(ForecastParams):
    """Model-predictive control: at every decision re-plan the windows-only cheapest pieces for
    the tokens left over the forecast horizon and, beyond it, the run's own past days as
    scenarios; train where carbon per token is at or below that plan's marginal price
    (curtail.planning.mpc_policy). The budget policy's guards keep the deadline."""

    kind: Literal["mpc"] = "mpc"
    climatology_days: int = Field(
        default=7, ge=1, description="past days whose samples at the same time of day are scenarios of later days"
    )
    climatology_sigmas: float = Field(
        default=1.0, ge=0,
        description="count on the climatology's mean supply less this many standard deviations (days independent)",
    )
    pace_fraction: float = Field(
        default=0.0, ge=0, le=1, description="relax the price to the threshold when behind this share of a linear schedule"
    )
    deadline_guard: bool = Field(default=True, description="run every site when the budget can only just be met")
    guard_margin: float = Field(default=0.1, ge=0, lt=1)
    hold_s: float = Field(default=0.0, ge=0, description="keep nodes this long after the price is crossed")


class OraclePolicyConfig(StrictModel):
    """Perfect foresight (reads the true future): the minimum-emission bound, shown beside
    every comparison; never a policy to deploy."""

    kind: Literal["oracle"] = "oracle"


PolicyConfig = Annotated[
    ThresholdPolicyConfig
    | AlwaysOnPolicyConfig
    | ForecastPolicyConfig
    | BudgetPolicyConfig
    | MpcPolicyConfig
    | OraclePolicyConfig,
    Field(discriminator="kind"),
]
"""A run's ``policy``: one config model per policy kind, told apart by ``kind``."""

POLICY_CONFIGS: dict[str, type[StrictModel]] = {
    model.model_fields["kind"].default: model for model in get_args(get_args(PolicyConfig)[0])
}
"""Every policy kind's config model, from :data:`PolicyConfig` (the one list of kinds)."""

POLICY_KINDS: tuple[str, ...] = tuple(POLICY_CONFIGS)

PolicyKind = Literal[POLICY_KINDS]  # type: ignore[valid-type]  # Literal["threshold", "always_on", ...]


# --------------------------------------------------------------------------------------------
# Sweeps over policies (curtail.policy_sweep; Ray Tune)

ParamValue = float | int | str | bool


class SearchDomain(StrictModel):
    """One searched parameter: exactly one of ``grid`` (every value, crossed with the other
    grids), ``choice`` (one at random), ``uniform`` / ``loguniform`` ``[low, high]`` floats,
    ``randint`` ``[low, high)`` integers. Written inline in TOML: ``{ uniform = [30, 120] }``."""

    grid: list[ParamValue] | None = Field(default=None, min_length=1)
    choice: list[ParamValue] | None = Field(default=None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDomain:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})"
            )
        for name in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name} needs [low, high] with low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self


SearchParam = SearchDomain | ParamValue
"""A fixed value or a :class:`SearchDomain`."""


class PolicySearchSpace(StrictModel):
    """Which policy kind a sweep tries, with its searched (or fixed) parameters."""

    kind: PolicyKind
    params: dict[str, SearchParam] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _params_exist(self) -> PolicySearchSpace:
        config_class = POLICY_CONFIGS[self.kind]
        unknown = sorted(set(self.params) - set(config_class.model_fields) - {"kind"})
        if unknown:
            raise ValueError(
                f"policy {self.kind!r} has no parameters {unknown}; it has "
                f"{sorted(set(config_class.model_fields) - {'kind'})}"
            )
        return self


class SweepConfig(StrictModel):
    """A Ray Tune search over policies (``curtail sweep CONFIG``; ``[sweep]`` in the TOML).

    Every trial simulates ``tune_run`` (its sites, period, budget) with one sampled policy and
    sampled ``rules`` / ``execution`` overrides (``training`` overrides only matter to the
    ``runtime`` trainable, which trains for real). The best trial by ``metric`` (trials that
    miss the budget, or finish after ``max_hours``, rank last) is then simulated unchanged on
    each of ``eval_runs``: tuned on one period, evaluated on another. ``max_hours`` picks a
    point on the emissions / completion-time front; without it the most patient policy that
    only just finishes in the tune period wins, which leaves no slack for a drier period.
    """

    tune_run: str
    eval_runs: list[str] = Field(default_factory=list)
    policies: list[PolicySearchSpace] = Field(min_length=1)
    rules: dict[str, SearchParam] = Field(default_factory=dict)
    execution: dict[str, SearchParam] = Field(default_factory=dict)
    training: dict[str, SearchParam] = Field(default_factory=dict)
    num_samples: int = Field(default=10, ge=1, description="samples per policy kind (times any grids)")
    metric: Literal["emissions_kg", "hours", "energy_kwh"] = "emissions_kg"
    require_completed: bool = True
    max_hours: float | None = Field(
        default=None, gt=0, description="trials finishing later rank after those in time (a point on the front)"
    )
    trainable: Literal["simulator", "runtime"] = "simulator"
    search: Literal["random", "optuna"] = Field(
        default="random",
        description="random: grid over the policy variants × random samples (Tune's BasicVariantGenerator); "
        "optuna: Optuna's TPE through Tune, variants as a choice, num_samples × variants trials in all "
        "(pip install 'curtail[sweep]')",
    )
    cpus_per_trial: float = Field(default=0.5, gt=0, description="Tune resources per trial (never 0)")
    max_concurrent_trials: int = Field(
        default=2, ge=1, description="2 × 0.5 CPU with reused actors beat 4-8 smaller trials on 2 cores"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _overrides_exist(self) -> SweepConfig:
        kinds = [p.kind for p in self.policies]
        if "oracle" in kinds:
            raise ValueError("the oracle is the bound every sweep reports, not a policy to search; remove it")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each policy kind once in sweep.policies (use grid values instead); got {kinds}")
        for section, model in (("rules", CurtailmentRules), ("execution", ExecutionConfig), ("training", TrainingConfig)):
            unknown = sorted(set(getattr(self, section)) - set(model.model_fields))
            if unknown:
                raise ValueError(f"sweep.{section} has no fields {unknown}")
        return self


# --------------------------------------------------------------------------------------------
# Tracking


class TrackingConfig(StrictModel):
    """Optional experiment tracking (``[tracking]``), off by default.

    ``tensorboard`` writes event files to ``<run_dir>/tensorboard/``; ``mlflow`` logs params,
    metrics over the run's clock and the summary to an MLflow store: by default a local file
    store in the run directory (``file:<run_dir>/mlruns``; a sweep: ``file:<sweep dir>/mlruns``),
    else ``mlflow_tracking_uri`` (a path, ``file:``, ``sqlite:///...`` or a server URL).
    Needs ``pip install 'curtail[tracking]'``.
    """

    tensorboard: bool = False
    mlflow: bool = False
    mlflow_tracking_uri: str | None = Field(
        default=None, description="default: file:<run_dir>/mlruns; relative paths resolve against the working directory"
    )
    experiment_name: str | None = Field(
        default=None, description="MLflow experiment (default: the experiment's name; sweeps add '-sweep')"
    )

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials_in_uri(cls, uri: str | None) -> str | None:
        # the config is copied into every run directory (manifest.json): no secrets in it
        if uri is not None and "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                "mlflow_tracking_uri carries credentials (user:password@host); it is written to every "
                "run directory. Give the bare URL and set MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
            )
        return uri

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow


# --------------------------------------------------------------------------------------------
# Live signals (curtail.sources, curtail.planning.live_calendar)

LIVE_POLICY_KINDS = ("threshold", "always_on", "forecast", "budget")
"""Policies a live run can follow: they read the signal up to now, and (forecast, budget) the
source's forecasts; the oracle needs the future itself."""


class ServedFault(StrictModel):
    """A fault a served trace injects (``[[live.source.faults]]``; demos and tests of a live run):
    from ``at_s`` seconds of the run's clock after its start (``duration_s`` too: a run that lags
    the wall meets them when it gets there).

    ``server_errors``: the next ``count`` requests answer HTTP 503; ``slow``: the next ``count``
    answers wait ``delay_s`` wall seconds (beyond ``timeout_s``: a timeout); ``rate_limit``: the next
    ``count`` answer HTTP 429; ``refuse_credentials``: logins refused and tokens revoked for
    ``duration_s``; ``down``: the server stopped for ``duration_s``.
    """

    at_s: float = Field(ge=0)
    kind: Literal["server_errors", "slow", "rate_limit", "refuse_credentials", "down"]
    count: int = Field(default=1, ge=1, description="requests it hits (server_errors, slow, rate_limit)")
    delay_s: float = Field(default=0.0, ge=0, description="slow: wall seconds each answer waits")
    duration_s: float = Field(default=0.0, ge=0, description="refuse_credentials, down: trace seconds it lasts")


class LiveSourceConfig(StrictModel):
    """Where a live run's carbon signal comes from (``[live.source]``).

    ``watttime`` (MOER; ``WATTTIME_USER`` / ``WATTTIME_PASSWORD``), ``electricitymaps``
    (``ELECTRICITYMAPS_API_KEY``) or ``vessim`` (a Vessim software-in-the-loop API) at ``base_url``
    (default: the provider's public API); ``served_trace`` serves the trace file ``path`` through
    the WattTime API on 127.0.0.1 at the run's ``training.realtime_speedup`` (demos, tests).
    Credentials come from the environment only.
    """

    kind: Literal["watttime", "electricitymaps", "vessim", "served_trace"]
    base_url: str | None = Field(default=None, description="default: the provider's public API")
    regions: dict[str, str] = Field(
        default_factory=dict, description="a site region's name at the source, where it differs"
    )
    path: Path | None = Field(default=None, description="served_trace: the trace CSV to serve")
    naive_timezone: str | None = Field(default=None, description="served_trace: zone of naive timestamps")
    timeout_s: float = Field(default=5.0, gt=0, description="longest wait for one answer (wall seconds)")
    faults: list[ServedFault] = Field(default_factory=list, description="served_trace: faults to inject")
    forecast_path: Path | None = Field(
        default=None, description="served_trace: a recorded WattTime forecast CSV served with the trace"
    )
    forecast_region: str | None = Field(
        default=None, description="served_trace: the region forecast_path forecasts (a one-region trace: it)"
    )
    synthetic_forecast_seed: int | None = Field(
        default=None,
        description="served_trace without forecast_path: publish forecasts the calibrated error model makes",
    )

    @model_validator(mode="after")
    def _served_trace_has_a_path(self) -> LiveSourceConfig:
        served_only = {"faults": self.faults, "forecast_path": self.forecast_path,
                       "forecast_region": self.forecast_region,
                       "synthetic_forecast_seed": self.synthetic_forecast_seed}
        given = [key for key, value in served_only.items() if value not in (None, [])]
        if given and self.kind != "served_trace":
            raise ValueError(f"{given} are for a served trace only (kind = 'served_trace')")
        if self.forecast_path is not None and self.synthetic_forecast_seed is not None:
            raise ValueError("a served trace publishes recorded forecasts (forecast_path) or synthetic ones "
                             "(synthetic_forecast_seed), not both")
        if (self.kind == "served_trace") != (self.path is not None):
            raise ValueError(
                "kind = 'served_trace' needs path = the trace CSV to serve"
                if self.path is None
                else f"path is for kind = 'served_trace' only; {self.kind!r} reads base_url"
            )
        if self.kind == "served_trace" and self.base_url is not None:
            raise ValueError("a served trace runs on 127.0.0.1 on a free port: remove base_url")
        return self


class LiveConfig(StrictModel):
    """Follow the grid now (``[live]``): every run of the experiment starts when it is launched
    and takes its curtailment windows from ``source`` as readings arrive.

    A failing source degrades in order (typed events in the run's log): the last good value while
    younger than ``max_stale_s``, then ``fallback_trace`` (a trace file covering the run), then
    ``lost_ci_g_per_kwh`` (by default far above any threshold: windows close after the
    hysteresis). Every reading is recorded in the run directory (``live_readings.jsonl``);
    ``curtail replay RUN_DIR`` simulates the run's decisions from it.
    """

    source: LiveSourceConfig
    duration_s: float = Field(gt=0, description="how long a run follows the signal (its deadline)")
    lag_s: float = Field(
        default=0.0, ge=0, description="run this far behind the source's clock (publication delay)"
    )
    max_stale_s: float = Field(default=900.0, ge=0, description="serve the last good value this long")
    retry_s: float = Field(default=60.0, gt=0, description="ask a failed source again after this long")
    recheck_s: float = Field(default=60.0, gt=0, description="look again this often for an overdue reading")
    step_s: float = Field(default=300.0, gt=0, description="the signal's step until two readings tell")
    fallback_trace: TraceSource | None = None
    lost_ci_g_per_kwh: float = Field(
        default=10_000.0, ge=0, description="assumed while the signal is lost (default: never curtailed)"
    )
    forecast_refresh_s: float = Field(
        default=300.0, gt=0, description="forecast and budget policies: fetch the newest forecast this often"
    )


# --------------------------------------------------------------------------------------------
# Runs and the experiment


class ReferenceFigures(StrictModel):
    """Published figures a run should reproduce; shown beside the simulated ones."""

    source: str
    emissions_kg: float | None = None
    share_energy_in_windows: float | None = Field(default=None, ge=0, le=1)
    hours: float | None = None


class RunSpec(StrictModel):
    """One run of an experiment: a policy over a subset of the sites.

    ``rules``, ``execution`` and ``token_budget`` override the experiment's values key by key.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    policy: PolicyConfig
    sites: list[str] = Field(min_length=1)
    start: datetime | Literal["now"] | None = Field(
        default=None, description='default: the traces\' common start; "now" for a live run'
    )
    deadline: datetime | None = None
    token_budget: float | None = Field(default=None, gt=0)
    rules: CurtailmentRules | None = None
    execution: ExecutionConfig | None = None
    reference: ReferenceFigures | None = None

    @field_validator("start", "deadline")
    @classmethod
    def _tz_aware(cls, value: datetime | str | None) -> datetime | str | None:
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError("give a zone, e.g. 2026-01-11T17:00:00Z (naive instants are ambiguous)")
        return value

    @field_validator("sites")
    @classmethod
    def _unique_sites(cls, sites: list[str]) -> list[str]:
        if len(set(sites)) != len(sites):
            raise ValueError(f"sites listed twice: {sites}")
        return sites

    @model_validator(mode="after")
    def _start_before_deadline(self) -> RunSpec:
        if isinstance(self.start, datetime) and self.deadline is not None and self.deadline <= self.start:
            raise ValueError(f"deadline ({self.deadline.isoformat()}) must be after start ({self.start.isoformat()})")
        return self


class ExperimentConfig(StrictModel):
    """A set of runs sharing traces, sites and defaults (one TOML file)."""

    name: str = "experiment"
    seed: int = 0
    traces: list[TraceSource] = Field(default_factory=list, description="at least one, unless [live]")
    forecasts: list[ForecastSource] = Field(default_factory=list)
    live: LiveConfig | None = None
    rules: CurtailmentRules = CurtailmentRules()
    execution: ExecutionConfig = ExecutionConfig()
    sites: dict[str, SiteConfig] = Field(min_length=1)
    token_budget: float = Field(gt=0, description="tokens to train per run")
    runs: list[RunSpec] = Field(min_length=1)
    training: TrainingConfig = TrainingConfig()
    output_dir: Path = Path("runs")
    sweep: SweepConfig | None = None
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _merge_run_overrides(cls, data: Any) -> Any:
        """Let a run override single keys of ``rules`` and ``execution``."""
        if not isinstance(data, dict):
            return data
        runs = data.get("runs")
        if not isinstance(runs, list):
            return data
        merged = []
        for run in runs:
            if isinstance(run, dict):
                run = dict(run)
                for section in ("rules", "execution"):
                    base = data.get(section, {})
                    if isinstance(base, BaseModel):  # only the keys set: defaults stay defaults
                        base = base.model_dump(exclude_unset=True)
                    if isinstance(run.get(section), dict) and isinstance(base, dict):  # else: reported below
                        run[section] = {**base, **run[section]}
            merged.append(run)
        return {**data, "runs": merged}

    @model_validator(mode="after")
    def _runs_use_known_sites(self) -> ExperimentConfig:
        names = [run.name for run in self.runs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"run names must be unique; repeated: {duplicates}")
        for run in self.runs:
            unknown = [s for s in run.sites if s not in self.sites]
            if unknown:
                raise ValueError(
                    f"run {run.name!r} uses sites {unknown} that are not defined; "
                    f"defined sites: {sorted(self.sites)}"
                )
        return self

    @model_validator(mode="after")
    def _average_signals_have_a_curtailment_rule(self) -> ExperimentConfig:
        """Average intensity has no curtailment level of its own: the default absolute 100 g
        would silently give a site like Germany's (rarely below it) no windows at all."""
        average = [t for t in self.traces if t.signal == "average"]
        live_average = self.live is not None and self.live.source.kind == "electricitymaps"
        if not average and not live_average:
            return self
        average_regions = {region for t in average for region in t.columns.values()}
        marginal_regions = {region for t in self.traces if t.signal == "marginal" for region in t.columns.values()}
        unmapped = any(not t.columns for t in average)  # its regions are the file's columns

        def reads_average(region: str) -> bool:
            return live_average or region in average_regions or (unmapped and region not in marginal_regions)

        for index, run in enumerate(self.runs):
            rules = self.rules_for(run)
            if rules.threshold_kind == "percentile" or "threshold_g_per_kwh" in rules.model_fields_set:
                continue
            regions = sorted(
                {self.sites[s].region for s in run.sites if s in self.sites and reads_average(self.sites[s].region)}
            )
            if not regions:
                continue
            source = (
                f"live.source.kind = {self.live.source.kind!r}" if live_average and self.live is not None
                else ", ".join(f'{t.path.name} (signal = "average")' for t in average)
            )
            where = "rules" if run.rules is None else f"runs.{index}.rules (run {run.name!r})"
            raise ValueError(
                f"run {run.name!r} reads average carbon intensity for {regions} ({source}), which has no "
                f"curtailment level of its own, but {where} leaves threshold_kind = \"absolute\" with the "
                f"default threshold_g_per_kwh = {rules.threshold_g_per_kwh:g} (an average-intensity grid may "
                f"never drop below it: no windows). Set rules.threshold_kind = \"percentile\" (with "
                "threshold_percentile, default 20, and percentile_window_s, default 604800 = a week), or set "
                "rules.threshold_g_per_kwh explicitly if you mean an absolute level"
            )
        return self

    @model_validator(mode="after")
    def _live_or_traces(self) -> ExperimentConfig:
        if self.live is None:
            if not self.traces:
                raise ValueError("give at least one [[traces]] file, or a [live] source to follow the grid now")
            now = [run.name for run in self.runs if run.start == "now"]
            if now:
                raise ValueError(f'runs {now} start = "now": that needs a [live] source; or give an instant')
            return self
        if self.training.clock != "realtime":
            raise ValueError(
                "a [live] experiment follows the wall clock: set training.clock = \"realtime\" "
                "(and realtime_speedup = 1 for a real source)"
            )
        if self.live.source.kind != "served_trace" and self.training.realtime_speedup != 1.0:
            raise ValueError(
                f"a live {self.live.source.kind} source runs at the grid's own pace: set "
                f"training.realtime_speedup = 1 (got {self.training.realtime_speedup}); "
                "only a served_trace runs faster"
            )
        for run in self.runs:
            if isinstance(run.start, datetime) or run.deadline is not None:
                raise ValueError(
                    f"run {run.name!r}: a live run starts now and lasts live.duration_s; "
                    "remove its start and deadline"
                )
            if run.policy.kind not in LIVE_POLICY_KINDS:
                raise ValueError(
                    f"run {run.name!r}: policy {run.policy.kind!r} reads the signal ahead of now, which a "
                    f"live run does not have; use one of {list(LIVE_POLICY_KINDS)}"
                )
            if getattr(run.policy, "forecast", None) == "synthetic":
                raise ValueError(
                    f"run {run.name!r}: forecast = 'synthetic' perturbs the future, which a live run does "
                    "not have; use 'auto' (the source's forecasts) or 'none' (a served trace can publish "
                    "synthetic ones: live.source.synthetic_forecast_seed)"
                )
            if getattr(run.policy, "seasonal_s", 0.0) > 0:
                raise ValueError(f"run {run.name!r}: seasonal_s is not supported live yet; set it to 0")
        if self.sweep is not None:
            raise ValueError("a sweep replays traces: remove [sweep] from a [live] experiment")
        return self

    @model_validator(mode="after")
    def _sweep_uses_known_runs(self) -> ExperimentConfig:
        if self.sweep is not None:
            names = [run.name for run in self.runs]
            unknown = [r for r in [self.sweep.tune_run, *self.sweep.eval_runs] if r not in names]
            if unknown:
                raise ValueError(f"sweep names runs {unknown} that are not defined; runs: {names}")
        return self

    @model_validator(mode="after")
    def _fragments_overlap(self) -> ExperimentConfig:
        if self.training.sync_fragments > 1:
            blocking = [run.name for run in self.runs if not self.execution_for(run).overlap_sync]
            if blocking:
                raise ValueError(
                    f"training.sync_fragments = {self.training.sync_fragments} staggers the fragments' syncs into "
                    f"the next round, which needs execution.overlap_sync = true (runs {blocking} have it off)"
                )
        return self

    def rules_for(self, run: RunSpec) -> CurtailmentRules:
        return run.rules or self.rules

    def execution_for(self, run: RunSpec) -> ExecutionConfig:
        return run.execution or self.execution

    def token_budget_for(self, run: RunSpec) -> float:
        return run.token_budget if run.token_budget is not None else self.token_budget

    def run(self, name: str) -> RunSpec:
        for run in self.runs:
            if run.name == name:
                return run
        raise ConfigError(f"no run named {name!r}; runs: {[r.name for r in self.runs]}")


def _keys_at(loc: tuple[int | str, ...], root: type[BaseModel] | None = None) -> list[str]:
    """The keys the config accepts at ``loc`` (where pydantic found an unknown key), best effort."""
    annotation: Any = root or ExperimentConfig
    parts = list(loc)
    while True:
        origin, args = get_origin(annotation), get_args(annotation)
        if origin is Annotated:
            annotation = args[0]
        elif origin in (Union, UnionType):  # pydantic puts a tagged member's tag (or class name) in loc
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tagged = [
                m for m in models if parts and parts[0] in (m.__name__, getattr(m.model_fields.get("kind"), "default", None))
            ]
            if tagged:
                annotation = tagged[0]
                parts.pop(0)
            elif len(models) == 1:
                annotation = models[0]
            else:
                return []
        elif not parts:
            break
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(parts.pop(0)))
            if field is None:
                return []
            annotation = field.annotation
        elif origin in (list, tuple, dict) and args:
            parts.pop(0)
            annotation = args[-1]
        else:
            return []
    return list(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def _format_validation_error(error: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    lines = [f"{source}: invalid config"]
    errors = error.errors()
    top_level = {(tuple(item["loc"]), item["type"]) for item in errors}
    for item in errors:
        loc = item["loc"]
        if loc[:1] == ("runs",) and loc[2:3] in (("rules",), ("execution",)) and (loc[2:], item["type"]) in top_level:
            continue  # the experiment's value merged into a run's override: reported once, at the experiment
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(item["loc"][-1]), _keys_at(item["loc"][:-1], root), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            message = f"unknown key (typo or renamed field?); {hint}remove it or fix its name"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make trace, forecast and output paths relative to the config file's folder."""

    def fix(entry: Any) -> Any:  # a path that is not a string is left for validation to name
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and not Path(entry["path"]).is_absolute():
            return {**entry, "path": str(base_dir / entry["path"])}
        return entry

    data = dict(data)
    for key in ("traces", "forecasts"):
        if isinstance(data.get(key), list):
            data[key] = [fix(e) for e in data[key]]
    live = data.get("live")
    if isinstance(live, dict):
        data["live"] = {**live, **{key: fix(live[key]) for key in ("source", "fallback_trace") if key in live}}
    training = data.get("training")
    if isinstance(training, dict):
        training = dict(training)
        for key in ("corpus", "heldout"):
            if isinstance(training.get(key), list):
                training[key] = [
                    str(base_dir / p) if isinstance(p, str) and not Path(p).is_absolute() else p for p in training[key]
                ]
        from curtail.run_store import is_uri  # (pyarrow: only when a config names paths)

        shards = training.get("corpus_shards")
        if isinstance(shards, str) and not is_uri(shards) and not Path(shards).is_absolute():
            training["corpus_shards"] = str(base_dir / shards)
        data["training"] = training
    return data


def parse_experiment(data: dict[str, Any], *, source: str = "<config>", base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a config dict (from TOML or a notebook); paths resolve against ``base_dir``."""
    if base_dir is not None and isinstance(data, dict):
        data = _resolve_paths(data, base_dir)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def project_root() -> Path:
    """The folder holding ``pyproject.toml`` and ``data/`` (the package's parent)."""
    return Path(__file__).resolve().parent.parent


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Load and validate an experiment TOML file.

    Relative trace and forecast paths resolve against the config file's folder;
    ``output_dir`` stays relative to the working directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error}); save the config as UTF-8") from None
    except (ValueError, RecursionError) as error:  # TOMLDecodeError; over-long integers; deep nesting
        raise ConfigError(f"{path}: not valid TOML: {error or type(error).__name__}") from None
    return parse_experiment(data, source=str(path), base_dir=path.parent.resolve())
