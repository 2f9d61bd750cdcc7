"""CPU cost per fix of the worker's hot path without a broker: decode+validate, the whole batch pipeline,
and the baselines' decode + H3 + encode work, best and median of several runs.

    python benchmarks/pipeline_cpu.py [--fixes 100000] [--per-message 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import make_messages, work
from fleetstream.codecs import decode_positions
from fleetstream.config import Settings
from fleetstream.streaming.pipeline import InRecord, PositionPipeline


class DictState(dict):
    def get(self, partition: int, key: bytes) -> bytes | None:  # type: ignore[override]
        return dict.get(self, key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixes", type=int, default=100_000)
    parser.add_argument("--per-message", type=int, default=50)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2000, help="messages per pipeline batch")
    args = parser.parse_args()
    messages = make_messages(args.fixes, args.devices, args.per_message)
    records = [InRecord("fleet.positions", hash(k) % 8, i, k, v) for i, (k, v) in enumerate(messages)]
    now_ms = int(time.time() * 1000)

    def decode() -> None:
        for k, v in messages:
            decode_positions(k, v, now_ms=now_ms)

    def baseline() -> None:
        for k, v in messages:
            work(k, v, now_ms)

    def pipeline() -> None:
        state = DictState()
        pipe = PositionPipeline(Settings.load(env={}), state, changelog_topic="changelog")
        for i in range(0, len(records), args.batch):
            out = pipe.process(records[i : i + args.batch])
            for _, key, value in out.state_writes:
                state[key] = value

    for name, fn in (("decode+validate", decode), ("baseline work", baseline), ("pipeline", pipeline)):
        costs = []
        for _ in range(args.runs):
            started = time.process_time()
            fn()
            costs.append((time.process_time() - started) / args.fixes * 1e6)
        print(f"{name:16s} best {min(costs):6.2f} us/fix  median {statistics.median(costs):6.2f} us/fix")


if __name__ == "__main__":
    main()
