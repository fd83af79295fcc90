"""The servers' collector settings (server.common.grpc_runtime.tune_garbage_collection)."""

from __future__ import annotations

import gc

from server.common.grpc_runtime import GC_THRESHOLDS, tune_garbage_collection


def test_startup_objects_are_frozen_and_the_young_generation_is_collected_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_garbage_collection()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 10_000  # everything imported so far
        # Cycles made afterwards are still found and freed.
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect(0) >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
