"""Per-fix cost of decoding + validating ``fleet.positions`` messages with each candidate validator, so the choice
in ``fleetstream/codecs.py`` can be reproduced. Prints µs per fix, the median of several runs (process CPU time).

    python benchmarks/codecs.py [--fixes 20000] [--per-message 1] [--runs 5]

"validate" times the check of an already parsed dict, "decode" bytes in to a checked result (orjson included).
msgspec and pydantic are measured only if installed (they are not dependencies; each needs the schema mirrored
by hand as a class, which is why they are shown for reference).
"""

# no `from __future__ import annotations`: msgspec and pydantic read the model annotations at class creation
import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Annotated, Any

import orjson

from fleetstream.codecs import _parse_rfc3339, decode_positions, format_ts, load_schema, parse_ts, position_from_dict

START_MS = 1_795_600_800_000  # 2026-11-25T10:00:00Z


def make_messages(n_fixes: int, devices: int, per_message: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """Deterministic keyed messages: devices random-walking around a city, the fields trackers usually send."""
    rng = random.Random(seed)
    state = {f"veh-{i:05d}": [53.40 + rng.uniform(-0.1, 0.1), -2.98 + rng.uniform(-0.1, 0.1), START_MS]
             for i in range(devices)}
    ids = list(state)
    out: list[tuple[bytes, bytes]] = []
    made = 0
    while made < n_fixes:
        device = ids[rng.randrange(devices)]
        s = state[device]
        fixes = []
        for _ in range(min(per_message, n_fixes - made)):
            s[0] += rng.gauss(0, 0.0002)
            s[1] += rng.gauss(0, 0.0003)
            s[2] += 5000 + rng.randrange(1000)
            fixes.append({"device_id": device, "ts": format_ts(s[2]), "lat": round(s[0], 6), "lon": round(s[1], 6),
                          "speed_kmh": round(rng.uniform(0.1, 80), 1), "heading_deg": round(rng.uniform(0, 359), 1),
                          "accuracy_m": 4.5})
        made += len(fixes)
        out.append((device.encode(), orjson.dumps(fixes[0] if per_message == 1 else fixes)))
    return out


def median_us(fn: Callable[[], Any], count: int, runs: int) -> float:
    costs = []
    for _ in range(runs):
        started = time.process_time()
        fn()
        costs.append((time.process_time() - started) / count * 1e6)
    return statistics.median(costs)


def candidates(messages: list[tuple[bytes, bytes]], now_ms: int) -> dict[str, tuple[Callable, Callable | None]]:
    """name -> (decode all messages, validate all parsed fixes or None)."""
    parsed = [(key.decode(), doc) for key, value in messages
              for doc in (lambda d: d if isinstance(d, list) else [d])(orjson.loads(value))]

    def each_fix(value: bytes) -> list[Any]:
        doc = orjson.loads(value)
        return doc if isinstance(doc, list) else [doc]

    out: dict[str, tuple[Callable, Callable | None]] = {
        "orjson.loads only (the floor)": (lambda: [orjson.loads(v) for _, v in messages], None),
        "hand-written, schema-derived (chosen)": (
            lambda: [decode_positions(k, v, now_ms=now_ms) for k, v in messages],
            lambda: [position_from_dict(d, k, now_ms) for k, d in parsed]),
    }
    import fastjsonschema
    import jsonschema

    compiled = fastjsonschema.compile(load_schema("position"))
    out["fastjsonschema compiled from the schema"] = (
        lambda: [compiled(d) for _, v in messages for d in each_fix(v)],
        lambda: [compiled(d) for _, d in parsed])
    reference = jsonschema.Draft202012Validator(load_schema("position"))
    out["jsonschema Draft202012Validator"] = (
        lambda: [reference.is_valid(d) for _, v in messages for d in each_fix(v)],
        lambda: [reference.is_valid(d) for _, d in parsed])
    try:
        import msgspec
    except ImportError:
        pass
    else:
        decoder = msgspec.json.Decoder(_msgspec_position(msgspec) | list[_msgspec_position(msgspec)])
        out["msgspec Struct mirroring the schema (+ parse_ts)"] = (
            lambda: [[parse_ts(p.ts) for p in (r if isinstance(r, list) else [r])]
                     for r in (decoder.decode(v) for _, v in messages)], None)
    try:
        import pydantic
    except ImportError:
        pass
    else:
        adapter = _pydantic_adapter(pydantic)
        out["pydantic TypeAdapter mirroring the schema"] = (
            lambda: [adapter.validate_json(v) for _, v in messages],
            lambda: [adapter.validate_python(d) for _, d in parsed])
    return out


_MSGSPEC_CLASS: list[Any] = []


def _msgspec_position(msgspec: Any) -> Any:
    if not _MSGSPEC_CLASS:
        def num(**bounds: float) -> Any:
            return Annotated[float, msgspec.Meta(**bounds)]

        class Position(msgspec.Struct, forbid_unknown_fields=True):
            device_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
            ts: str | Annotated[int, msgspec.Meta(ge=0)]
            lat: num(ge=-90, le=90)  # type: ignore[valid-type]
            lon: num(ge=-180, le=180)  # type: ignore[valid-type]
            speed_kmh: num(ge=0, le=2000) | None = None  # type: ignore[valid-type]
            heading_deg: num(ge=0, le=360) | None = None  # type: ignore[valid-type]
            accuracy_m: num(ge=0) | None = None  # type: ignore[valid-type]
            altitude_m: num(ge=-1000, le=100_000) | None = None  # type: ignore[valid-type]
            attributes: dict[str, Any] | None = None

        _MSGSPEC_CLASS.append(Position)
    return _MSGSPEC_CLASS[0]


def _pydantic_adapter(pydantic: Any) -> Any:
    from typing_extensions import TypedDict

    field = pydantic.Field

    class Position(TypedDict, total=False):
        __pydantic_config__ = pydantic.ConfigDict(extra="forbid")  # type: ignore[misc]
        device_id: Annotated[str, field(min_length=1, max_length=128)]
        ts: str | Annotated[int, field(ge=0)]
        lat: Annotated[float, field(ge=-90, le=90)]
        lon: Annotated[float, field(ge=-180, le=180)]
        speed_kmh: Annotated[float, field(ge=0, le=2000)] | None
        heading_deg: Annotated[float, field(ge=0, le=360)] | None
        accuracy_m: Annotated[float, field(ge=0)] | None
        altitude_m: Annotated[float, field(ge=-1000, le=100_000)] | None
        attributes: dict[str, Any] | None

    return pydantic.TypeAdapter(Position | list[Position])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixes", type=int, default=20_000)
    parser.add_argument("--per-message", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    messages = make_messages(args.fixes, 500, args.per_message)
    now_ms = START_MS + 10**10
    print(f"{args.fixes} fixes, {args.per_message} per message, median of {args.runs} runs, µs per fix")
    print(f"{'candidate':52s} {'validate':>9s} {'decode':>9s}")
    for name, (decode, validate) in candidates(messages, now_ms).items():
        slow = name.startswith("jsonschema")
        share = messages[: len(messages) // 20] if slow else messages  # jsonschema: a 5% sample is plenty
        count = args.fixes * len(share) // len(messages)
        if slow:
            decode_share, validate_share = candidates(share, now_ms)[name]
        else:
            decode_share, validate_share = decode, validate
        validate_us = f"{median_us(validate_share, count, args.runs):9.2f}" if validate_share else f"{'-':>9s}"
        print(f"{name:52s} {validate_us} {median_us(decode_share, count, args.runs):9.2f}")

    stamps = [START_MS + i * 37 for i in range(args.fixes)]
    texts = [format_ts(ts) for ts in stamps]
    offsets = [f"{t[:-1]}+01:00" for t in texts]
    for name, fn in (("format_ts (ascending ms, cached second)", lambda: [format_ts(t) for t in stamps]),
                     ("parse_ts '...00.123Z' (cached parts)", lambda: [parse_ts(t) for t in texts]),
                     ("parse_ts '...00.123+01:00' (cached parts)", lambda: [parse_ts(t) for t in offsets]),
                     ("parse_ts full parse (a second seen first)", lambda: [_parse_rfc3339(t) for t in offsets])):
        print(f"{name:52s} {'':9s} {median_us(fn, len(stamps), args.runs):9.2f}")

if __name__ == "__main__":
    main()
