"""Run a worker process: create topics, then hand the loop to Faust's Worker (signals, graceful stop)."""

from __future__ import annotations

import asyncio
import gc
import logging

import faust

from fleetstream.config import Settings
from fleetstream.domain.geofences import load_geofences
from fleetstream.domain.kernels import warm_up
from fleetstream.streaming.app import create_app
from fleetstream.streaming.geofence_feed import publish_geofences
from fleetstream.streaming.topics import ensure_topics


class _Worker(faust.Worker):
    """Faust's worker sets the root logger to DEBUG whatever ``loglevel`` says, building a log record per
    message (~10% of the time, FIELD-NOTES); put the level back once logging is set up."""

    def __init__(self, *args: object, fleetstream_level: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._fleetstream_level = fleetstream_level

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        logger.setLevel(self._fleetstream_level)


# Young-generation collections every 50,000 allocations instead of 700: a batch allocates hundreds of thousands
# of short-lived objects (decoded fixes, outputs, rows) over a heap of device states and Faust's own objects, and
# CPython's defaults spent several µs per fix collecting them. Measured in benchmarks/pipeline_cpu.py terms: the
# aggregating pipeline went from ~20 to ~17 µs per fix with these thresholds.
# Within a batch the collector is paused altogether (pipeline.collector_paused).
GC_THRESHOLDS = (50_000, 20, 20)


def run_worker(settings: Settings) -> int:
    gc.set_threshold(*GC_THRESHOLDS)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(ensure_topics(settings))
    if settings.geofences_file:  # validated whole before anything is published; a bad file stops the start
        fences = load_geofences(settings.geofences_file, max_vertices=settings.max_geofence_vertices)
        loop.run_until_complete(publish_geofences(settings, fences))
    if settings.rules_file:  # likewise: a bad rules file stops the start, naming the rule and the problem
        from fleetstream.domain.rules import load_rules
        from fleetstream.streaming.rules_feed import publish_rules

        loop.run_until_complete(publish_rules(settings, load_rules(settings.rules_file)))
    if settings.readers_file or settings.assets_file:  # RFID readers and asset metadata: validated whole first
        from fleetstream.domain.assets import AssetRegistry
        from fleetstream.domain.readers import ReaderRegistry
        from fleetstream.streaming.readers_feed import publish_assets, publish_readers

        readers = ReaderRegistry.load(settings.readers_file) if settings.readers_file else None
        assets = AssetRegistry.load(settings.assets_file) if settings.assets_file else None
        if readers is not None:
            loop.run_until_complete(publish_readers(settings, readers))
        if assets is not None:
            loop.run_until_complete(publish_assets(settings, assets))
    warm_up()  # the geofence lookup's compiled loops: compiled (first run) or loaded before the first batch
    app = create_app(settings)
    level = getattr(logging, settings.log_level.upper())
    worker = _Worker(app, loglevel=settings.log_level, loop=loop, fleetstream_level=level)
    gc.freeze()  # what start-up made (modules, app, tables' objects) is never collected: leave it out of every scan
    worker.execute_from_commandline()
    return 0
