"""Decode + validate cost per fix: fleetstream's codecs vs a fastjsonschema-compiled validator vs jsonschema,
all from the same schemas/position.json, on the same messages; median of several runs.

    python benchmarks/codecs.py [--fixes 50000] [--per-message 1] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import make_messages
from fleetstream.codecs import decode_positions, load_schema


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixes", type=int, default=50_000)
    parser.add_argument("--per-message", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    messages = make_messages(args.fixes, 500, args.per_message)
    now_ms = int(time.time() * 1000)

    import fastjsonschema
    import jsonschema

    schema = load_schema("position")
    compiled = fastjsonschema.compile(schema)
    reference = jsonschema.Draft202012Validator(schema)

    def ours() -> None:
        for key, value in messages:
            decode_positions(key, value, now_ms=now_ms)

    def with_fastjsonschema() -> None:
        for _, value in messages:
            doc = orjson.loads(value)
            for item in doc if isinstance(doc, list) else [doc]:
                compiled(item)

    def with_jsonschema() -> None:
        for _, value in messages[: len(messages) // 10]:
            doc = orjson.loads(value)
            for item in doc if isinstance(doc, list) else [doc]:
                reference.is_valid(item)

    for name, fn, share in (("fleetstream codecs (models + reasons)", ours, 1.0),
                            ("orjson + fastjsonschema (validate only)", with_fastjsonschema, 1.0),
                            ("orjson + jsonschema (validate only)", with_jsonschema, 0.1)):
        costs = []
        for _ in range(args.runs):
            started = time.process_time()
            fn()
            costs.append((time.process_time() - started) / (args.fixes * share) * 1e6)
        print(f"{name:42s} median {statistics.median(costs):6.2f} us/fix  best {min(costs):6.2f}")


if __name__ == "__main__":
    main()
