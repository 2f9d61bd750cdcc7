"""``fleetstream worker | demo | simulate | replay | broker``: the command-line edge.

Every setting is a ``--kebab-case`` flag on the commands that use the settings, overriding its ``FLEETSTREAM_*``
environment variable. Bad values are refused before anything starts, naming the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from fleetstream.config import ENV_PREFIX, Settings, SettingsError, setting_fields
from fleetstream.rfid_cli import add_rfid_commands, run_rfid_command


def _add_settings_flags(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    group = parser.add_argument_group("settings (each also read from FLEETSTREAM_<NAME>)")
    for name, type_, default, help_text, meta in setting_fields():
        if only is not None and name not in only:
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if name == "sasl_password":
            shown = "(unset)"
        extra = f" [choices: {', '.join(meta['choices'])}]" if "choices" in meta else ""
        group.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, metavar=type_.__name__.upper()
            if isinstance(type_, type) else "LIST",
            help=f"{help_text}{extra} (default: {shown}; env {ENV_PREFIX}{name.upper()})",
        )


def _settings_from(args: argparse.Namespace) -> Settings:
    names = [name for name, *_ in setting_fields()]
    return Settings.load(**{name: getattr(args, name, None) for name in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetstream",
        description="Fleet and asset tracking stream processor: GPS, RFID and telemetry from Kafka to enriched "
        "positions, geofence events, aggregates and alerts.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = sub.add_parser("worker", help="run a stream-processing worker (many may share one app_id)")
    _add_settings_flags(worker)

    demo = sub.add_parser("demo", help="embedded broker + worker + simulator, with a live status line")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    demo.add_argument("--vehicles", type=int, default=200, help="simulated vehicles (default 200)")
    demo.add_argument("--rate", type=float, default=2000.0, help="simulated fixes per second (default 2000)")
    demo.add_argument("--fixes-per-message", type=int, default=10,
                      help="fixes per Kafka message: gateways upload arrays of buffered fixes (default 10)")
    demo.add_argument("--malformed-share", type=float, default=0.01, help="share of malformed records (0.01)")
    _add_settings_flags(demo)

    simulate = sub.add_parser("simulate", help="publish a simulated fleet to the positions topic")
    simulate.add_argument("--vehicles", type=int, default=100)
    simulate.add_argument("--rate", type=float, default=1000.0, help="fixes per second across the fleet")
    simulate.add_argument("--duration", type=float, default=60.0, help="seconds of simulated time to publish")
    simulate.add_argument("--fixes-per-message", type=int, default=1)
    simulate.add_argument("--malformed-share", type=float, default=0.01)
    simulate.add_argument("--seed", type=int, default=1)
    _add_settings_flags(simulate, only=("broker", "positions_topic", "partitions", "security_protocol",
                                        "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile",
                                        "ssl_certfile", "ssl_keyfile", "tail_single_record"))

    replay = sub.add_parser("replay", help="replay a real trace (CSV, GeoLife .plt or a folder of them)")
    replay.add_argument("file", help="trace file or directory")
    replay.add_argument("--speed", type=float, default=0.0, help="time factor: 1 = real time, 0 = as fast as possible")
    replay.add_argument("--fixes-per-message", type=int, default=1)
    replay.add_argument("--device-prefix", default="", help="prefix for device ids from the trace")
    _add_settings_flags(replay, only=("broker", "positions_topic", "partitions", "security_protocol",
                                      "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile",
                                      "ssl_certfile", "ssl_keyfile", "tail_single_record"))

    geofences = sub.add_parser("geofences", help="load, delete or list the geofences the cluster holds")
    geo_sub = geofences.add_subparsers(dest="geofence_command", required=True, metavar="ACTION")
    geo_load = geo_sub.add_parser("load", help="validate a GeoJSON file or directory and publish every geofence")
    geo_load.add_argument("path", help="GeoJSON FeatureCollection/Feature file, or a directory of them")
    geo_delete = geo_sub.add_parser("delete", help="publish tombstones: devices inside get an exit")
    geo_delete.add_argument("ids", nargs="+", help="geofence ids")
    geo_list = geo_sub.add_parser("list", help="print the geofences on the compacted topic")
    geo_list.add_argument("--json", action="store_true", help="print the GeoJSON FeatureCollection")
    geo_only = ("broker", "geofences_topic", "partitions", "max_geofence_vertices", "security_protocol",
                "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile",
                "tail_single_record")
    for parser_ in (geo_load, geo_delete, geo_list):
        _add_settings_flags(parser_, only=geo_only)

    rules = sub.add_parser("rules", help="load, delete or list the alert rules the cluster holds")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    rules_load = rules_sub.add_parser("load", help="validate a YAML/JSON rules file and publish every rule")
    rules_load.add_argument("path", help="rules file (see docs/RULES.md)")
    rules_delete = rules_sub.add_parser("delete", help="publish tombstones: the rules stop (active alerts clear)")
    rules_delete.add_argument("ids", nargs="+", help="rule ids")
    rules_list = rules_sub.add_parser("list", help="print the rules on the compacted topic")
    rules_list.add_argument("--json", action="store_true", help="print the rules as JSON")
    rules_only = ("broker", "rules_topic", "partitions", "security_protocol", "sasl_mechanism", "sasl_username",
                  "sasl_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "tail_single_record")
    for parser_ in (rules_load, rules_delete, rules_list):
        _add_settings_flags(parser_, only=rules_only)

    add_rfid_commands(sub, _add_settings_flags)  # readers, assets

    broker = sub.add_parser("broker", help="run the embedded Tansu broker (Kafka protocol, memory storage)")
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument("--port", type=int, default=9092)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except SettingsError as exc:
        print(f"fleetstream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "worker":
        settings = _settings_from(args)  # refuse bad settings before importing Faust
        from fleetstream.domain.geofences import GeofenceError
        from fleetstream.domain.rules import RuleError
        from fleetstream.rfid_cli import RFID_FILE_ERRORS  # --readers-file / --assets-file refused
        from fleetstream.streaming.runner import run_worker

        try:
            return run_worker(settings)
        except RFID_FILE_ERRORS as exc:
            print(f"fleetstream worker: refused: {exc}", file=sys.stderr)
            return 2
        except (GeofenceError, RuleError, FileNotFoundError) as exc:  # --geofences-file / --rules-file refused
            print(f"fleetstream worker: refused: {exc}", file=sys.stderr)
            return 2
    if args.command == "demo":
        from fleetstream.demo import DemoOptions, run_demo

        settings = _settings_from(args)
        options = DemoOptions(
            duration_s=args.duration, vehicles=args.vehicles, rate_per_s=args.rate,
            fixes_per_message=args.fixes_per_message, malformed_share=args.malformed_share,
            use_embedded=getattr(args, "broker", None) is None and _env_broker() is None,
        )
        return run_demo(settings, options)
    if args.command == "simulate":
        return _run_simulate(args)
    if args.command == "replay":
        return _run_replay(args)
    if args.command == "broker":
        return _run_broker(args)
    if args.command == "geofences":
        return _run_geofences(args)
    if args.command == "rules":
        return _run_rules(args)
    if args.command in ("readers", "assets"):
        return run_rfid_command(args, _settings_from(args))
    raise AssertionError(args.command)


def _env_broker() -> str | None:
    import os

    return os.environ.get(ENV_PREFIX + "BROKER")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise SettingsError(f"{name}: must be positive, got {value}")


def _run_simulate(args: argparse.Namespace) -> int:
    import time

    from fleetstream.simulate import SimulationConfig, simulate
    from fleetstream.streaming.kafka import client_security
    from fleetstream.streaming.topics import ensure_topics

    settings = _settings_from(args)
    for name in ("vehicles", "rate", "duration", "fixes_per_message"):
        _positive(name, getattr(args, name))
    config = SimulationConfig(
        vehicles=args.vehicles, rate_per_s=args.rate, duration_s=args.duration, seed=args.seed,
        batch_size=args.fixes_per_message, malformed_share=args.malformed_share,
        start_ms=int(time.time() * 1000),  # fixes from now on: event-time lag and offline rules stay meaningful
    )

    async def go() -> Any:
        await ensure_topics(settings)
        return await simulate(",".join(settings.bootstrap_servers), config, topic=settings.positions_topic,
                              producer_options=client_security(settings))

    stats = asyncio.run(go())
    print(f"published {stats}")
    return 0


def _run_replay(args: argparse.Namespace) -> int:
    from fleetstream.simulate import replay
    from fleetstream.streaming.kafka import client_security
    from fleetstream.streaming.topics import ensure_topics

    settings = _settings_from(args)

    async def go() -> Any:
        await ensure_topics(settings)
        return await replay(
            ",".join(settings.bootstrap_servers), args.file, topic=settings.positions_topic, speed=args.speed,
            batch_size=args.fixes_per_message, device_prefix=args.device_prefix,
            producer_options=client_security(settings),
        )

    try:
        stats = asyncio.run(go())
    except (ValueError, FileNotFoundError) as exc:
        print(f"fleetstream replay: error: {exc}", file=sys.stderr)
        return 2
    print(f"published {stats}")
    return 0


def _run_geofences(args: argparse.Namespace) -> int:
    import orjson

    from fleetstream.domain.geofences import GeofenceError, load_geofences
    from fleetstream.streaming.geofence_feed import delete_geofences, publish_geofences, read_geofences
    from fleetstream.streaming.topics import ensure_topics

    settings = _settings_from(args)
    if args.geofence_command == "load":
        try:
            fences = load_geofences(args.path, max_vertices=settings.max_geofence_vertices)
        except (GeofenceError, FileNotFoundError) as exc:
            print(f"fleetstream geofences: refused: {exc}", file=sys.stderr)
            return 2

        async def load() -> int:
            await ensure_topics(settings)
            return await publish_geofences(settings, fences)

        print(f"published {asyncio.run(load())} geofences to {settings.geofences_topic}")
        return 0
    if args.geofence_command == "delete":
        count = asyncio.run(delete_geofences(settings, args.ids))
        print(f"published {count} tombstones to {settings.geofences_topic}")
        return 0
    held = asyncio.run(read_geofences(settings))
    if args.json:
        print(orjson.dumps({"type": "FeatureCollection", "features": list(held.values())},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        for fence_id, feature in sorted(held.items()):
            props = feature.get("properties") or {}
            print(f"{fence_id}\t{feature['geometry']['type']}\t{props.get('name', '')}")
        print(f"{len(held)} geofences", file=sys.stderr)
    return 0


def _run_rules(args: argparse.Namespace) -> int:
    import orjson

    from fleetstream.domain.rules import RuleError, load_rules
    from fleetstream.streaming.rules_feed import delete_rules, publish_rules, read_rules
    from fleetstream.streaming.topics import ensure_topics

    settings = _settings_from(args)
    if args.rules_command == "load":
        try:
            ruleset = load_rules(args.path)
        except RuleError as exc:
            print(f"fleetstream rules: refused: {exc}", file=sys.stderr)
            return 2

        async def load() -> int:
            await ensure_topics(settings)
            return await publish_rules(settings, ruleset)

        print(f"published {asyncio.run(load())} rules to {settings.rules_topic}")
        return 0
    if args.rules_command == "delete":
        count = asyncio.run(delete_rules(settings, args.ids))
        print(f"published {count} tombstones to {settings.rules_topic}")
        return 0
    held = asyncio.run(read_rules(settings))
    if args.json:
        print(orjson.dumps(held, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    else:
        for rule_id, rule in sorted(held.items()):
            print(f"{rule_id}\t{rule.get('kind', '')}\t{rule.get('severity', '')}")
        print(f"{len(held)} rules", file=sys.stderr)
    return 0


def _run_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from fleetstream.embedded import EmbeddedBroker

    broker = EmbeddedBroker(host=args.host, port=args.port).start()
    print(f"Tansu broker listening on {broker.url} (memory storage); Ctrl-C to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set() and broker.process is not None and broker.process.poll() is None:
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
