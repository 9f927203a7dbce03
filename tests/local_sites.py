"""A real multi-node Ray cluster on one machine: a head plus one raylet per site.

Started exactly as a real deployment is (``ray start --head`` on the head, ``ray start
--address HEAD --labels site=NAME --resources '{"site_NAME": N}'`` on each site's nodes), only
every node is a raylet on 127.0.0.1. Used by the multi-node and job-submit tests, which talk to
it only through subprocesses: the pytest process never joins a Ray cluster, so the session
fixture ``ray_cluster`` (tests/conftest.py) and this cluster never meet in one process.

Isolation from any other Ray on the host (several Ray instances on one host confuse Ray
Train: "Found multiple active Ray instances"): free ports everywhere, its own ``--temp-dir``
(so ``/tmp/ray/ray_current_cluster`` is never written and a plain ``ray.init()`` elsewhere
does not find this cluster), its own token (``RAY_AUTH_MODE=token`` with a token file of its
own: Ray ≥ 2.59 turns token authentication on by default), ``RAY_ADDRESS`` set for its
processes. Teardown kills
only the process groups it started; ``ray stop`` would kill every Ray on the host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")

# Ray Train settings for a 2-core machine: fast report polling (a report blocks until the
# controller polls, every 2 s by default), no preemption watcher, no metrics. Set on every
# node: workers inherit the raylet's environment, not the driver's.
TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalSites:
    """Handle on a running local multi-node cluster (see the module doc)."""

    sites: dict[str, int]  # site -> workers it can hold (its site_<name> resource)
    cpus_per_site: int = 1
    node_resources: dict[str, float] = field(default_factory=dict)  # more custom resources on each site's raylet
    object_store_bytes: int = 200 * 2**20
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ct-", dir="/tmp")))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    process_groups: list[int] = field(default_factory=list)
    autoscale: bool = False  # no site node at start: Ray's fake multi-node autoscaler launches them
    idle_timeout_s: float = 3.0  # autoscale: an idle site node is removed after this long

    @property
    def address(self) -> str:
        """The GCS address: ``ray start --address``, ``ray.init(address=...)``, ``curtail run --address``."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The job-submission address: ``ray job submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for this cluster's processes and clients (token auth on, its own token)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.update(TRAIN_ENV)
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_ADDRESS=self.address,
        )
        if self.autoscale:  # the head's autoscaler runs the fake provider, polling every second
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        env.update(extra)
        return env

    def _ray_start(self, args: list[str], attempts: int = 3) -> None:
        """``ray start`` one node; retried because a raylet gets only 30 s (hard-coded in Ray
        2.60) to register with the GCS, which a loaded 2-core machine can miss."""
        for attempt in range(1, attempts + 1):
            ports = []
            for flag in (
                "--node-manager-port",
                "--object-manager-port",
                "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port",
                "--runtime-env-agent-port",
                "--metrics-export-port",
            ):
                ports += [flag, str(free_port())]
            command = [
                RAY, "start", *args, *ports, "--node-ip-address", "127.0.0.1",
                "--object-store-memory", str(self.object_store_bytes), "--temp-dir", str(self.root / "ray"),
                "--disable-usage-stats", "--log-style", "record",
            ]  # fmt: skip
            # A session of its own: the processes this node spawns stay in this process group
            # (or descend from it), which teardown kills.
            process = subprocess.Popen(
                command, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            )  # fmt: skip
            self.process_groups.append(process.pid)
            output, _ = process.communicate(timeout=120)
            if process.returncode == 0:
                return
            _kill(_processes_of([process.pid]))  # a half-started node must not join later
            if attempt == attempts or "timed out during startup" not in output:
                raise RuntimeError(f"{' '.join(command)} failed:\n{output}")

    def autoscaler_config(self) -> dict:
        """Ray's fake multi-node provider: one node type per site (its label and resource),
        from zero to one node, launched as a raylet on this machine when a site asks."""
        site_types = {
            f"site-{site}": {
                "resources": {"CPU": self.cpus_per_site, f"site_{site}": capacity,
                              "object_store_memory": self.object_store_bytes},
                "labels": {"site": site}, "node_config": {}, "min_workers": 0, "max_workers": 1,
            }
            for site, capacity in self.sites.items()
        }
        return {
            "cluster_name": "curtail-local", "max_workers": len(self.sites),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {},
                                                          "max_workers": 0}, **site_types},
            "head_node_type": "ray.head.default", "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_s / 60, "auth": {}, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }

    def start(self) -> LocalSites:
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        head = []
        if self.autoscale:
            config = self.root / "autoscaler.json"
            config.write_text(json.dumps(self.autoscaler_config()))
            head = ["--autoscaling-config", str(config)]
        try:
            self._ray_start(
                [
                    *head,
                    "--head",
                    "--port",
                    str(self.gcs_port),
                    "--num-cpus",
                    "0",
                    "--labels",
                    "role=head",
                    "--include-dashboard",
                    "true",
                    "--dashboard-host",
                    "127.0.0.1",
                    "--dashboard-port",
                    str(self.dashboard_port),
                ]
            )
            for site, capacity in ({} if self.autoscale else self.sites).items():
                self._ray_start(
                    [
                        "--address",
                        self.address,
                        "--num-cpus",
                        str(self.cpus_per_site),
                        "--labels",
                        f"site={site}",
                        "--resources",
                        json.dumps({f"site_{site}": capacity, **self.node_resources}),
                    ]
                )
            self.wait_for_nodes(1 if self.autoscale else 1 + len(self.sites))
        except BaseException:
            self.stop()
            raise
        return self

    def python(self, code: str, timeout: float = 120) -> str:
        """Run a Python snippet as a client of this cluster; returns its stdout."""
        done = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"client failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def nodes(self) -> list[dict]:
        """Alive nodes: ``node_id``, ``labels`` (user labels only), ``resources``."""
        out = self.python(
            "import json, ray\n"
            f"ray.init(address={self.address!r}, log_to_driver=False)\n"
            "nodes = [{'node_id': n['NodeID'], 'labels': {k: v for k, v in n.get('Labels', {}).items()"
            " if not k.startswith('ray.io/')}, 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]\n"
            "print('NODES=' + json.dumps(nodes))\n"
        )
        line = next(line for line in out.splitlines() if line.startswith("NODES="))
        return json.loads(line.removeprefix("NODES="))

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = self.nodes()
            if len(alive) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(alive)} of {count} nodes came up: {alive}")
            time.sleep(1)

    def stop(self) -> None:
        """Kill every process this cluster started (never ``ray stop``), then remove its files.

        Ray workers put themselves in process groups of their own, so the kill list is the
        process groups of the ``ray start`` commands plus all their descendants.
        """
        _kill(_processes_of(self.process_groups))
        self.process_groups.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _kill(pids: list[int]) -> None:
    """SIGTERM, a grace period, then SIGKILL for what is left."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [pid for pid in pids if _alive(pid)]


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _processes_of(groups: list[int]) -> list[int]:
    """Processes in the given process groups, and all their descendants."""
    table = _process_table()
    found = {pid for pid, (_, group) in table.items() if group in groups}
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= children
        grew = bool(children)
    found.discard(os.getpid())
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------------------------------------
# A tiny two-site experiment for the cluster tests (the config style of tests/test_runtime.py)

REPO = Path(__file__).resolve().parent.parent
STEP_TOKENS = 2 * 64  # tiny preset: batch 2 × seq 64
STEP_S = 300.0  # virtual seconds per step at each site


def write_tiny_experiment(
    folder: Path, name: str = "multinode", token_budget: int = 10_000_000, autoscaled_sites: bool = False,
    training: str = "",
) -> Path:
    """A TOML experiment: sites a and b on a 2-hour scripted trace, the tiny preset.

    Both are curtailed from 00:05 (UTC), so their worker groups start together (start-up is
    most of a tiny run's wall time); a leaves after 01:10 and b after 01:40, so the run goes
    FEDERATED (a+b) then SINGLE (b): about 30 optimizer steps in all.
    """
    folder.mkdir(parents=True, exist_ok=True)
    minutes = [5 * i for i in range(24)]
    rows = ["time,A,B"] + [
        f"2026-01-11T{m // 60:02d}:{m % 60:02d}:00+00:00,"
        f"{20.0 if 5 <= m < 70 else 400.0},{30.0 if 5 <= m < 100 else 450.0}"
        for m in minutes
    ]
    trace = folder / "trace.csv"
    trace.write_text("\n".join(rows) + "\n")
    corpus = folder / "corpus.txt"
    corpus.write_text((REPO / "data/text/tinyshakespeare.txt").read_text()[:60_000])
    site = f"training_power_w = 1000\nidle_power_w = 200\ntokens_per_s = {STEP_TOKENS / STEP_S}\n"
    config = folder / f"{name}.toml"
    config.write_text(f"""\
name = "{name}"
seed = 3
token_budget = {token_budget}  # the default is more than fits: the trace end stops the run
output_dir = "{folder / "runs"}"

[[traces]]
path = "{trace}"

[rules]
threshold_g_per_kwh = 100
hysteresis_s = 600
provisioning_s = 240

[execution]
round_s = 900
sync_s = 5
group_start_s = 30
join = "immediate"

[training]
preset = "tiny"
corpus = ["{corpus}"]
vocab_size = 300
batch_size = 2
eval_batches = 1
eval_batch_size = 2
cpus_per_worker = 0.5
cache_dir = "{folder / "cache"}"
command_timeout_s = 120
autoscaled_sites = {"true" if autoscaled_sites else "false"}
{training}

[sites.a]
region = "A"
{site}
[sites.b]
region = "B"
{site}
[[runs]]
name = "two-sites"
policy = {{ kind = "threshold" }}
sites = ["a", "b"]
""")
    return config


def run_dir_of(config: Path) -> Path:
    """Where ``curtail run`` writes the tiny experiment's run directory."""
    return config.parent / "runs" / config.stem / "two-sites"
