"""The link model: transfer seconds from bytes, bandwidth and latency; sync pauses in the
simulator; the trade of round length against link speed."""

from __future__ import annotations

import dataclasses

import pytest
from planning_fixtures import RATE, T0_S, make_context, pattern, seconds_in, simulate
from pydantic import ValidationError

from curtail.config import ExecutionConfig, SiteConfig
from curtail.planning.links import Link, Links
from curtail.planning.policy import SiteState

# d20: a bf16 pseudo-gradient up, fp32 weights down, over 100 Mbit/s with 50 ms one way
D20_LINK = {"sync_mb_sent": 1122.0, "sync_mb_received": 2244.0, "link_mbit_per_s": 100.0, "link_latency_ms": 50.0}


def site(**link) -> SiteConfig:
    return SiteConfig(region="r", training_power_w=1000, idle_power_w=200, tokens_per_s=RATE, **link)


def test_transfer_seconds_are_latency_plus_bits_over_bandwidth() -> None:
    assert Link(100.0, 50.0).transfer_s(1122.0) == pytest.approx(0.05 + 1122 * 8 / 100)  # 89.8 s
    assert Link(None, 50.0).transfer_s(1e6) == 0.0  # no link: transfers take no time
    links = Links(ExecutionConfig(sync_s=5, **D20_LINK), {"near": site(link_mbit_per_s=1000.0, link_latency_ms=1.0),
                                                          "far": site()})
    assert links.upload_s("far") == pytest.approx(0.05 + 89.76)
    assert links.download_s("near") == pytest.approx(0.001 + 2244 * 8 / 1000)
    assert links.sync_pause_s(["near", "far"]) == pytest.approx(5 + links.upload_s("far") + links.download_s("far"))
    assert links.join_pause_s("near") == pytest.approx(5 + links.download_s("near"))


def test_without_a_link_a_sync_is_sync_s_as_before() -> None:
    links = Links(ExecutionConfig(sync_s=5, sync_mb_sent=1122.0), {"a": site(), "b": site()})
    assert links.sync_pause_s(["a", "b"]) == 5 and links.join_pause_s("a") == 5


def test_link_keys_are_checked() -> None:
    with pytest.raises(ValidationError, match="link_mbit_per_s"):
        ExecutionConfig(link_mbit_per_s=0)
    with pytest.raises(ValidationError, match="sync_mb_sent"):
        ExecutionConfig(sync_mb_sent=-1)
    with pytest.raises(ValidationError, match="link_latency_ms"):
        site(link_latency_ms=-5)


def two_sites_always_on(execution: ExecutionConfig, token_budget: float = 4 * 3600 * 2 * RATE):
    context = make_context({"a": pattern("H" * 288), "b": pattern("H" * 288)}, execution=execution,
                           token_budget=token_budget)
    return simulate(context, "always_on")


def test_the_simulator_pauses_every_sync_for_the_slowest_members_transfers() -> None:
    base = ExecutionConfig(round_s=600, sync_s=5, group_start_s=0)
    slow = ExecutionConfig(round_s=600, sync_s=5, group_start_s=0, **D20_LINK)
    fast, linked = two_sites_always_on(base), two_sites_always_on(slow)
    pause_s = Links(slow, {"a": site(), "b": site()}).sync_pause_s(["a", "b"])  # 5 + 89.8 + 179.6
    assert pause_s == pytest.approx(5 + 0.05 + 89.76 + 0.05 + 179.52)
    assert fast.tokens == linked.tokens  # the same budget, later
    assert linked.num_syncs == fast.num_syncs  # one sync per 600 s of training either way
    syncing = seconds_in(linked, "a", SiteState.SYNCING)
    assert syncing == pytest.approx(seconds_in(fast, "a", SiteState.SYNCING) + linked.num_syncs * (pause_s - 5), rel=1e-9)
    assert linked.finish_s - fast.finish_s == pytest.approx(linked.num_syncs * (pause_s - 5), rel=1e-9)
    assert linked.finish_s > T0_S


def test_longer_rounds_win_back_a_slow_link() -> None:
    """The trade a sweep explores: on 100 Mbit/s, syncing every 600 s spends ~30 % of the time
    on transfers; every 1800 s ~13 %; on 10 Gbit/s round length hardly matters."""

    def hours(round_s: float, mbit: float) -> float:
        execution = ExecutionConfig(round_s=round_s, sync_s=5, group_start_s=0,
                                    **{**D20_LINK, "link_mbit_per_s": mbit})
        trajectory = two_sites_always_on(execution)
        return (trajectory.finish_s - T0_S) / 3600

    assert hours(1800, 100) < hours(600, 100) - 0.5
    assert hours(600, 10_000) - hours(1800, 10_000) < 0.1


def test_overlap_hides_transfers_shorter_than_the_round() -> None:
    """With overlap_sync the members train through their transfers: on the d20 link (274 s of
    transfers) a 600-s round hides them all, a 120-s round only 120 s of them."""
    def finish_h(round_s: float, overlap: bool) -> float:
        execution = ExecutionConfig(round_s=round_s, sync_s=5, group_start_s=0, overlap_sync=overlap, **D20_LINK)
        return (two_sites_always_on(execution).finish_s - T0_S) / 3600

    transfers_s = 0.05 + 89.76 + 0.05 + 179.52
    links = Links(ExecutionConfig(round_s=600, sync_s=5, overlap_sync=True, **D20_LINK), {"a": site(), "b": site()})
    assert links.sync_pause_s(["a", "b"]) == 5  # hidden
    short = Links(ExecutionConfig(round_s=120, sync_s=5, overlap_sync=True, **D20_LINK), {"a": site(), "b": site()})
    assert short.sync_pause_s(["a", "b"]) == pytest.approx(5 + transfers_s - 120)
    # in 4 staggered fragments the last leaves 3/4 into the round with 1/4 of the bytes
    assert short.sync_pause_s(["a", "b"], fragments=4) == pytest.approx(5 + (transfers_s - 120) / 4)
    unlinked = (two_sites_always_on(ExecutionConfig(round_s=600, sync_s=5, group_start_s=0)).finish_s - T0_S) / 3600
    assert finish_h(600, True) == pytest.approx(unlinked)  # as if the link were free
    assert finish_h(600, False) > finish_h(600, True) + 1  # the blocking sync pays ~45 % more per round
    assert finish_h(120, False) > finish_h(120, True) > unlinked


def test_a_joining_site_pays_its_download() -> None:
    """b's window opens while a and c are in a federated round: b joins it, pausing for sync_s
    and its download."""
    execution = ExecutionConfig(round_s=3600, sync_s=5, group_start_s=0, **D20_LINK)
    context = make_context({"a": pattern("L" * 288), "c": pattern("L" * 288), "b": pattern("H" * 3 + "L" * 285)},
                           execution=execution)
    context = dataclasses.replace(context, token_budget=6 * 3600 * RATE)
    trajectory = simulate(context, "threshold")
    (join, *_) = [e for e in trajectory.events if e.event == "join_round" and e.site == "b"]
    download_s = Links(execution, context.sites).download_s("b")
    (paused,) = [i for i in trajectory.intervals_of("b") if i.state is SiteState.SYNCING and i.start_s == join.t_s]
    assert paused.end_s - paused.start_s == pytest.approx(5 + download_s)  # 5 + 179.6 s
