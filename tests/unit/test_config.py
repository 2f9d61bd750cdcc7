from __future__ import annotations

import pytest

from fleetstream.config import Settings, SettingsError


def test_defaults_are_the_contract():
    s = Settings.load(env={})
    assert s.positions_topic == "fleet.positions"
    assert s.enriched_topic == "fleet.positions.enriched"
    assert s.partitions == 8
    assert s.h3_resolution == 9
    assert s.bootstrap_servers == ["localhost:9092"]


def test_environment_then_flags_override():
    env = {"FLEETSTREAM_PARTITIONS": "4", "FLEETSTREAM_BROKER": "kafka://a:1,b:2",
           "FLEETSTREAM_H3_EXTRA_RESOLUTIONS": "7,8"}
    s = Settings.load(env=env)
    assert s.partitions == 4
    assert s.bootstrap_servers == ["a:1", "b:2"]
    assert s.h3_extra_resolutions == (7, 8)
    assert s.all_h3_resolutions == (9, 7, 8)
    s2 = Settings.load(env=env, partitions="6", broker=None)
    assert s2.partitions == 6
    assert s2.bootstrap_servers == ["a:1", "b:2"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FLEETSTREAM_PARTITIONS", "many", "partitions"),
        ("FLEETSTREAM_PARTITIONS", "0", "partitions: 0 is below the minimum 1"),
        ("FLEETSTREAM_H3_RESOLUTION", "16", "h3_resolution: 16 is above the maximum 15"),
        ("FLEETSTREAM_H3_EXTRA_RESOLUTIONS", "7,x", "h3_extra_resolutions"),
        ("FLEETSTREAM_TABLE_STORE", "redis", "table_store: 'redis' is not one of auto, rocksdb, memory"),
        ("FLEETSTREAM_TAIL_SINGLE_RECORD", "maybe", "tail_single_record"),
        ("FLEETSTREAM_BATCH_WITHIN_S", "nan", "batch_within_s"),
        ("FLEETSTREAM_BROKER", "http://x", "broker"),
        ("FLEETSTREAM_SECURITY_PROTOCOL", "KERBEROS", "security_protocol"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(name, value, message):
    with pytest.raises(SettingsError, match=message):
        Settings.load(env={name: value})


def test_secrets_are_redacted():
    s = Settings.load(env={"FLEETSTREAM_SASL_PASSWORD": "hunter2"})
    assert s.redacted()["sasl_password"] == "***"
    assert "hunter2" not in repr(s.redacted())


def test_cli_refuses_bad_flag_with_the_setting_name(capsys):
    from fleetstream.cli import main

    assert main(["worker", "--partitions", "-3"]) == 2
    assert "partitions: -3 is below the minimum 1" in capsys.readouterr().err
