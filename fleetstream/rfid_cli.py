"""``fleetstream readers | assets``: load, delete or list RFID readers and asset metadata (compacted topics).

Kept out of ``cli.py`` so the RFID commands live in one place; ``cli.py`` only registers and dispatches them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fleetstream.config import Settings
from fleetstream.domain.assets import AssetError
from fleetstream.domain.readers import ReaderError

RFID_FILE_ERRORS = (ReaderError, AssetError)  # what a bad --readers-file / --assets-file raises

RFID_SETTINGS = ("broker", "readers_topic", "asset_registry_topic", "partitions", "security_protocol",
                 "sasl_mechanism", "sasl_username", "sasl_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile",
                 "tail_single_record")


def add_rfid_commands(sub: Any, add_settings_flags: Callable[[argparse.ArgumentParser, Sequence[str]], None]) -> None:
    """``readers`` and ``assets`` subcommands, each with ``load PATH``, ``delete ID...`` and ``list [--json]``."""
    for noun, what, ids in (("readers", "RFID readers", "reader ids"), ("assets", "asset metadata", "tag ids")):
        parser = sub.add_parser(noun, help=f"load, delete or list the {what} the cluster holds")
        actions = parser.add_subparsers(dest=f"{noun}_command", required=True, metavar="ACTION")
        load = actions.add_parser("load", help=f"validate a JSON/YAML file and publish all {what}")
        load.add_argument("path", help="readers file (see examples/readers.json)" if noun == "readers"
                          else "assets file: {tag_id: {keep_inside, authorised_vehicles, ...}} or a list")
        delete = actions.add_parser("delete", help="publish tombstones")
        delete.add_argument("ids", nargs="+", help=ids)
        listing = actions.add_parser("list", help="print what the compacted topic holds")
        listing.add_argument("--json", action="store_true", help="print JSON")
        for action in (load, delete, listing):
            add_settings_flags(action, RFID_SETTINGS)


def run_rfid_command(args: argparse.Namespace, settings: Settings) -> int:
    """``fleetstream readers|assets load FILE | delete ID... | list``."""
    import orjson

    from fleetstream.domain.assets import AssetRegistry
    from fleetstream.domain.readers import ReaderRegistry
    from fleetstream.streaming import readers_feed as feed
    from fleetstream.streaming.topics import ensure_topics

    readers = args.command == "readers"
    topic = settings.readers_topic if readers else settings.asset_registry_topic
    action = args.readers_command if readers else args.assets_command
    if action == "load":
        try:
            registry: ReaderRegistry | AssetRegistry = (ReaderRegistry if readers else AssetRegistry).load(args.path)
        except (ReaderError, AssetError, FileNotFoundError) as exc:
            print(f"fleetstream {args.command}: refused: {exc}", file=sys.stderr)
            return 2

        async def load() -> int:
            await ensure_topics(settings)
            if readers:
                return await feed.publish_readers(settings, registry)  # type: ignore[arg-type]
            return await feed.publish_assets(settings, registry)  # type: ignore[arg-type]

        print(f"published {asyncio.run(load())} {args.command} to {topic}")
        return 0
    if action == "delete":
        delete = feed.delete_readers if readers else feed.delete_assets
        print(f"published {asyncio.run(delete(settings, args.ids))} tombstones to {topic}")
        return 0
    held = asyncio.run(feed.read_readers(settings) if readers else feed.read_assets(settings))
    if args.json:
        print(orjson.dumps(held, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    else:
        for key, doc in sorted(held.items()):
            if readers:
                where = f"vehicle {doc['vehicle_id']}" if doc.get("vehicle_id") else doc.get("zone_id") or ""
                print(f"{key}\t{doc.get('role', 'vehicle' if doc.get('vehicle_id') else 'area')}\t{where}\t"
                      f"{doc.get('name') or ''}")
            else:
                print(f"{key}\t{'keep_inside' if doc.get('keep_inside') else ''}\t{doc.get('name') or ''}")
        print(f"{len(held)} {args.command}", file=sys.stderr)
    return 0
