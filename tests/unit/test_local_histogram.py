"""LocalHistogram: observations kept as C doubles, put in Prometheus's buckets
at flush exactly as Histogram.observe would have put them one by one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from gateway.metrics import BATCH_BUCKETS, REDIS_BUCKETS, LocalHistogram


def buckets_of(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return {
        sample.labels["le"]: sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name + "_bucket"
    }


def total_of(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name + "_sum") or 0.0


def test_a_flush_buckets_as_observe_would() -> None:
    values = [0.0, *REDIS_BUCKETS, 0.00011, 0.3, 1.0000001, 7.5, 2]  # bounds themselves, ints
    local_registry, direct_registry = CollectorRegistry(), CollectorRegistry()
    local = LocalHistogram(
        Histogram("seconds", "", buckets=REDIS_BUCKETS, registry=local_registry), REDIS_BUCKETS
    )
    direct = Histogram("seconds", "", buckets=REDIS_BUCKETS, registry=direct_registry)
    for value in values:
        local.observe(value)
        direct.observe(value)
    assert buckets_of(local_registry, "seconds") != buckets_of(direct_registry, "seconds")
    local.flush()
    assert buckets_of(local_registry, "seconds") == buckets_of(direct_registry, "seconds")
    assert total_of(local_registry, "seconds") == total_of(direct_registry, "seconds")
    # Flushed values are forgotten: a flush with nothing new changes nothing.
    local.flush()
    assert buckets_of(local_registry, "seconds") == buckets_of(direct_registry, "seconds")
    local.observe(3)
    direct.observe(3)
    local.flush()
    assert buckets_of(local_registry, "seconds") == buckets_of(direct_registry, "seconds")


def test_counts_taken_already_bucketed_are_added_too() -> None:
    registry = CollectorRegistry()
    local = LocalHistogram(
        Histogram("appends", "", buckets=BATCH_BUCKETS, registry=registry), BATCH_BUCKETS
    )
    local.counts[0] += 2  # two batches of one append (gateway/web/telemetry.py's way)
    local.total += 2
    local.observe(64)
    local.flush()
    seen = buckets_of(registry, "appends")
    assert seen["1.0"] == 2 and seen["32.0"] == 2 and seen["64.0"] == 3 and seen["+Inf"] == 3
    assert total_of(registry, "appends") == 66
