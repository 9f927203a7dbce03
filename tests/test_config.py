"""Experiment configs: every file in experiments/ loads; typos, unknown sites, double power specs
and naive instants are refused with a message naming the key; run overrides merge key by key."""

from __future__ import annotations

import copy
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from planning_fixtures import PAPER_TOML, REPO
from pydantic import ValidationError

from curtail.config import (
    ConfigError,
    ExecutionConfig,
    ExperimentConfig,
    SiteConfig,
    load_experiment,
    parse_experiment,
)

EXPERIMENTS = sorted((REPO / "experiments").glob("*.toml"))


def test_there_are_experiments():
    assert PAPER_TOML in EXPERIMENTS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_loads(path):
    experiment = load_experiment(path)
    assert isinstance(experiment, ExperimentConfig) and experiment.runs
    for source in experiment.traces:
        assert source.path.is_absolute() and source.path.is_file(), source.path
    for forecast in experiment.forecasts:
        assert forecast.path.is_file(), forecast.path
    for run in experiment.runs:
        assert set(run.sites) <= set(experiment.sites)
        assert experiment.token_budget_for(run) > 0


def test_paper_values():
    experiment = load_experiment(PAPER_TOML)
    assert experiment.token_budget == 12_268_339_200
    assert experiment.rules.threshold_g_per_kwh == 100 and experiment.rules.hysteresis_s == 600
    assert experiment.rules.provisioning_s == 240 and experiment.rules.poll_s == 10
    for site in experiment.sites.values():
        assert site.site_training_power_w == 2024 and site.site_idle_power_w == 468
    prior = experiment.run("threshold-prior-overheads")
    assert experiment.execution_for(prior).round_restart_s == 91
    with pytest.raises(ConfigError, match="no run named 'nope'"):
        experiment.run("nope")


# ------------------------------------------------------------------------------- rejections


@pytest.fixture
def paper() -> dict:
    return tomllib.loads(PAPER_TOML.read_text())


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def rejection(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_experiment(data, source="bad.toml", base_dir=PAPER_TOML.parent)
    message = str(info.value)
    assert message.startswith("bad.toml: invalid config")
    return message


UNKNOWN_KEYS = {
    "top level": (lambda d: d.update(token_budgett=1), "token_budgett"),
    "site": (lambda d: d["sites"]["de"].update(training_power=2024), "sites.de.training_power"),
    "execution": (lambda d: d["execution"].update(round_seconds=600), "execution.round_seconds"),
    "rules": (lambda d: d["rules"].update(threshold=100), "rules.threshold"),
    "trace": (lambda d: d["traces"][0].update(units="g_per_kwh"), "traces.0.units"),
    "run": (lambda d: d["runs"][2].update(site=["de"]), "runs.2.site"),
    "run execution override": (
        lambda d: d["runs"][0]["execution"].update(sync_seconds=5),
        "runs.0.execution.sync_seconds",
    ),
    "run rules override": (
        lambda d: d["runs"][0]["rules"].update(hysteresis=5),
        "runs.0.rules.hysteresis",
    ),
    "run policy": (
        lambda d: d["runs"][6]["policy"].update(threshold_g_per_kwh=5),
        "threshold_g_per_kwh",
    ),
}


@pytest.mark.parametrize("where", UNKNOWN_KEYS)
def test_unknown_keys_are_rejected_by_name(paper, where):
    mutate, named = UNKNOWN_KEYS[where]
    mutate(paper)
    message = rejection(paper)
    line = next(line for line in message.splitlines() if named in line)
    assert "unknown key" in line and "remove it or fix its name" in line


def test_unknown_key_in_a_toml_file_names_file_and_key(tmp_path):
    text = PAPER_TOML.read_text().replace(
        "round_restart_s = 0", "round_restart_s = 0\nrestart_s = 0", 1
    )
    path = write_toml(tmp_path, text.replace("../data", str(REPO / "data")))
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(path) in str(info.value) and "execution.restart_s: unknown key" in str(info.value)


def test_unknown_site_is_rejected(paper):
    paper["runs"][1]["sites"] = ["spp_tx", "mars"]
    message = rejection(paper)
    assert "run 'centralized-spp_tx' uses sites ['mars'] that are not defined" in message
    assert "defined sites: ['caiso_north', 'de', 'nem_sa', 'spp_tx']" in message


def test_site_listed_twice_is_rejected(paper):
    paper["runs"][4]["sites"] = ["nem_sa", "nem_sa"]
    assert "runs.4.sites" in rejection(paper)


def test_duplicate_run_names_are_rejected(paper):
    paper["runs"][1]["name"] = paper["runs"][0]["name"]
    assert "run names must be unique; repeated: ['centralized-caiso_north']" in rejection(paper)


def test_power_both_per_site_and_per_gpu_is_rejected(paper):
    paper["sites"]["nem_sa"].update(training_power_per_gpu_w=506, idle_power_per_gpu_w=117)
    message = rejection(paper)
    assert "sites.nem_sa" in message and "not both" in message


def test_power_per_gpu_multiplies_by_gpus():
    site = SiteConfig(
        region="R",
        num_gpus=8,
        training_power_per_gpu_w=506,
        idle_power_per_gpu_w=117,
        tokens_per_s=1,
    )
    assert site.site_training_power_w == 8 * 506 and site.site_idle_power_w == 8 * 117
    with pytest.raises(ValueError, match="must both be set"):
        SiteConfig(region="R", training_power_w=2024, tokens_per_s=1)
    with pytest.raises(ValueError, match="set training_power_w and idle_power_w"):
        SiteConfig(region="R", tokens_per_s=1)


@pytest.mark.parametrize("key", ["start", "deadline"])
def test_naive_instants_are_rejected(paper, key):
    paper["runs"][0][key] = datetime(2026, 1, 11, 18)  # TOML local date-time: no zone
    message = rejection(paper)
    assert f"runs.0.{key}" in message and "give a zone" in message
    paper["runs"][0][key] = datetime(2026, 1, 11, 18, tzinfo=UTC)
    parse_experiment(paper, base_dir=PAPER_TOML.parent)


def test_naive_start_in_toml_is_rejected(tmp_path):
    text = PAPER_TOML.read_text().replace("../data", str(REPO / "data"))
    text = text.replace('name = "threshold"\n', 'name = "threshold"\nstart = 2026-01-11T18:00:00\n')
    with pytest.raises(ConfigError, match=r"runs\.6\.start: .*give a zone"):
        load_experiment(write_toml(tmp_path, text))


def test_restart_longer_than_round_is_rejected(paper):
    paper["runs"][6]["execution"] = {"round_restart_s": 600}
    assert "round_restart_s (600.0) must be shorter than round_s (600.0)" in rejection(paper)


def test_staggered_fragments_need_overlapped_syncs_and_own_the_averager_actors(paper):
    paper["training"] = {"sync_fragments": 3}
    assert "training.sync_fragments = 3 staggers the fragments' syncs into the next round, which needs " \
           "execution.overlap_sync = true" in rejection(paper)
    paper["execution"] = {**paper.get("execution", {}), "overlap_sync": True}
    assert parse_experiment(paper, source="ok.toml", base_dir=PAPER_TOML.parent).training.averager_actors == 3
    paper["training"]["averager_shards"] = 2
    assert "averager_shards = 2 must be 1 or 3" in rejection(paper)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(write_toml(tmp_path, "name = \n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_experiment(tmp_path / "missing.toml")


# ------------------------------------------------------------------------------- overrides


def test_run_overrides_merge_with_the_experiment(paper):
    paper["execution"].update(sync_s=7, round_s=900)
    paper["rules"].update(threshold_g_per_kwh=80)
    experiment = parse_experiment(paper, base_dir=PAPER_TOML.parent)

    prior = experiment.execution_for(experiment.run("threshold-prior-overheads"))
    assert (prior.sync_s, prior.round_restart_s, prior.group_start_s, prior.join) == (
        47,
        91,
        0,
        "next_round",
    )
    assert prior.round_s == 900  # not overridden: the experiment's value, not the default 600

    centralized = experiment.run("centralized-de")
    execution, rules = experiment.execution_for(centralized), experiment.rules_for(centralized)
    assert execution.group_start_s == 0 and (execution.sync_s, execution.round_s) == (7, 900)
    assert (
        rules.provisioning_s == 0 and rules.threshold_g_per_kwh == 80 and rules.hysteresis_s == 600
    )

    plain = experiment.run("threshold")  # no override: the experiment's objects
    assert experiment.execution_for(plain) == experiment.execution
    assert experiment.rules_for(plain).threshold_g_per_kwh == 80


def test_override_with_experiment_defaults_and_budget(paper):
    data = copy.deepcopy(paper)
    del data["execution"]
    data["runs"][6]["token_budget"] = 1e9
    experiment = parse_experiment(data, base_dir=PAPER_TOML.parent)
    prior = experiment.execution_for(experiment.run("threshold-prior-overheads"))
    assert prior.round_s == ExecutionConfig().round_s and prior.sync_s == 47
    assert experiment.token_budget_for(experiment.run("threshold")) == 1e9
    assert experiment.token_budget_for(experiment.run("centralized-de")) == 12_268_339_200


def test_configs_are_frozen():
    experiment = load_experiment(PAPER_TOML)
    with pytest.raises(ValidationError, match="frozen"):
        experiment.rules.threshold_g_per_kwh = 50  # type: ignore[misc]


# ------------------------------------------------------------------------------- average intensity


def average_config(rules: dict | None = None, run_rules: dict | None = None) -> dict:
    """Germany's 2020 average intensity beside the paper trace's marginal CAISO_NORTH."""
    site = {"training_power_w": 2024, "idle_power_w": 468, "tokens_per_s": 1000}
    run = {"name": "germany", "policy": {"kind": "threshold"}, "sites": ["de"]}
    if run_rules is not None:
        run["rules"] = run_rules
    data = {
        "token_budget": 1e9,
        "traces": [
            {"path": "../data/traces/avg_ci_2020_germany.csv", "signal": "average",
             "naive_timezone": "UTC", "columns": {"Carbon Intensity": "DE"}},
            {"path": "../data/traces/watttime_moer_2026-01-11_4regions.csv"},
        ],
        "sites": {"de": {"region": "DE", **site}, "caiso": {"region": "CAISO_NORTH", **site}},
        "runs": [run, {"name": "caiso", "policy": {"kind": "threshold"}, "sites": ["caiso"]}],
    }
    if rules is not None:
        data["rules"] = rules
    return data


def test_average_signal_without_a_percentile_rule_is_refused_with_the_fix():
    message = rejection(average_config())
    assert "run 'germany' reads average carbon intensity for ['DE']" in message
    assert 'avg_ci_2020_germany.csv (signal = "average")' in message
    assert 'rules leaves threshold_kind = "absolute" with the default threshold_g_per_kwh = 100' in message
    assert 'Set rules.threshold_kind = "percentile"' in message
    assert "set rules.threshold_g_per_kwh explicitly if you mean an absolute level" in message
    assert "'caiso'" not in message  # its region comes from a marginal trace
    message = rejection(average_config(rules={"hysteresis_s": 300}, run_rules={"provisioning_s": 0}))
    assert "runs.0.rules (run 'germany') leaves threshold_kind" in message


@pytest.mark.parametrize(
    "rules, run_rules",
    [
        ({"threshold_kind": "percentile"}, None),
        ({"threshold_g_per_kwh": 100}, None),  # an absolute level, said out loud
        (None, {"threshold_kind": "percentile", "threshold_percentile": 30}),
        (None, {"threshold_g_per_kwh": 250}),
    ],
)
def test_average_signal_with_a_curtailment_rule_loads(rules, run_rules):
    experiment = parse_experiment(average_config(rules, run_rules), base_dir=PAPER_TOML.parent)
    assert experiment.run("germany").sites == ["de"]


def test_object_rules_keep_their_defaults_unset_when_a_run_overrides_a_key():
    from curtail.config import CurtailmentRules

    data = average_config(run_rules={"hysteresis_s": 0})
    data["rules"] = CurtailmentRules(threshold_kind="percentile")
    experiment = parse_experiment(data, base_dir=PAPER_TOML.parent)
    rules = experiment.rules_for(experiment.run("germany"))
    assert rules.threshold_kind == "percentile" and rules.hysteresis_s == 0
    assert "threshold_g_per_kwh" not in rules.model_fields_set
    data["rules"] = CurtailmentRules(hysteresis_s=300)  # absolute by default: refused
    assert "threshold_kind = \"absolute\"" in rejection(data)


def test_forecast_error_scale_is_a_typed_knob():
    from curtail.config import ForecastParams, ForecastPolicyConfig

    field = ForecastParams.model_fields["forecast_error_scale"]
    assert field.default == 1.0 and "0 = perfect" in field.description
    assert ForecastPolicyConfig(forecast_error_scale=0).forecast_error_scale == 0
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        ForecastPolicyConfig(forecast_error_scale=-0.5)


# ------------------------------------------------------------------------------- live experiments


def live_config(**changes) -> dict:
    data = tomllib.loads((REPO / "experiments" / "live_demo.toml").read_text())
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        node = data
        for part in path:
            node = node[part] if not isinstance(node, list) else node[int(part)]
        if value is None:
            node.pop(key)
        else:
            node[key] = value
    return data


def test_the_live_demo_resolves_its_served_trace_next_to_the_config():
    experiment = load_experiment(REPO / "experiments" / "live_demo.toml")
    assert experiment.live is not None and not experiment.traces
    assert experiment.live.source.path.is_absolute() and experiment.live.source.path.is_file()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"training.clock": "virtual"}, 'set training.clock = "realtime"'),
        ({"runs.0.policy": {"kind": "oracle"}}, "reads the signal ahead of now"),
        ({"runs.0.policy": {"kind": "forecast", "forecast": "synthetic"}}, "perturbs the future"),
        ({"runs.0.policy": {"kind": "budget", "seasonal_s": 86400}}, "seasonal_s is not supported live"),
        ({"live.source": {"kind": "watttime", "synthetic_forecast_seed": 1}}, "for a served trace only"),
        ({"live.source": {"kind": "served_trace", "path": "x.csv", "synthetic_forecast_seed": 1,
                          "forecast_path": "f.csv"}}, "not both"),
        ({"runs.0.deadline": "2026-01-12T00:00:00Z"}, "remove its start and deadline"),
        ({"live.source": {"kind": "served_trace"}}, "needs path = the trace CSV"),
        ({"live.source": {"kind": "watttime", "path": "x.csv"}}, "path is for kind = 'served_trace' only"),
        ({"live.source": {"kind": "watttime"}}, "realtime_speedup = 1"),
        ({"live.duration_s": None}, "live.duration_s"),
        ({"live.lag": 3}, "did you mean 'lag_s'"),
        ({"live": None}, "or a [live] source"),
    ],
)
def test_live_configs_are_checked(changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_experiment(live_config(**changes), base_dir=REPO / "experiments")


def test_start_now_needs_a_live_source():
    data = tomllib.loads(PAPER_TOML.read_text())
    data["runs"][0]["start"] = "now"
    with pytest.raises(ConfigError, match='start = "now": that needs a \\[live\\] source'):
        parse_experiment(data, base_dir=PAPER_TOML.parent)


def test_a_live_sites_region_missing_from_the_served_trace_is_refused_before_any_cluster():
    from curtail.errors import PreflightError
    from curtail.preflight import check_live_files

    check_live_files(load_experiment(REPO / "experiments" / "live_demo.toml"))
    data = live_config()
    data["sites"]["nem_sa"]["region"] = "NOWHERE"
    with pytest.raises(PreflightError, match=r"live.source: .* has no column for regions \['NOWHERE'\]"):
        check_live_files(parse_experiment(data, base_dir=REPO / "experiments"))


def test_replace_validates_what_it_changes():
    """``config.replace(...)`` is the validated way to derive a config: a negative budget or a
    misspelt key is a ConfigError naming the key (``model_copy`` would take both)."""
    import curtail

    config = curtail.load_experiment(PAPER_TOML)
    faster = config.replace(token_budget=6e9, training=config.training.replace(preset="tiny"))
    assert faster.token_budget == 6e9 and faster.training.preset == "tiny" and faster.sites == config.sites
    with pytest.raises(ConfigError, match=r"token_budget: Input should be greater than 0"):
        config.replace(token_budget=-5)
    with pytest.raises(ConfigError, match=r"token_budgte: unknown key .* did you mean 'token_budget'"):
        config.replace(token_budgte=5)
    with pytest.raises(ConfigError, match=r"TrainingConfig.replace\(\): invalid config\n  presett: .* did you mean 'preset'"):
        config.training.replace(presett="tiny")


def test_the_outer_step_is_averaging_by_default_and_nesterov_momentum_the_rule_or_a_number_below_one():
    import curtail

    config = curtail.load_experiment(PAPER_TOML)
    assert config.training.outer_optimizer == "average"
    assert curtail.load_experiment(REPO / "experiments" / "demo.toml").training.outer_optimizer == "average"
    assert config.training.outer_momentum == "auto"
    assert config.training.replace(outer_momentum=0.6).outer_momentum == 0.6
    with pytest.raises(ConfigError, match=r"outer_momentum"):
        config.training.replace(outer_momentum=1.0)
    with pytest.raises(ConfigError, match=r"outer_momentum"):
        config.training.replace(outer_momentum="Auto")


def test_the_cli_says_its_version(capsys):
    from curtail import __version__
    from curtail.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"curtail {__version__}"
