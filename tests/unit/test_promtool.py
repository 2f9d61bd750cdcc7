"""deploy/prometheus as Prometheus' own checker sees it: the configuration and rules are valid, the rules' unit
tests pass, every alert has a test that makes it fire, and those tests do fail when an expectation is wrong.

promtool comes with the Debian package ``prometheus`` that .ci/run installs; outside CI the tests skip
without it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy_support import DEPLOY, PROMETHEUS_CONFIG, RULES_DIR

RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs the Debian package 'prometheus'")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_config_is_valid_and_finds_the_rules(promtool: str):
    done = run(promtool, "check", "config", PROMETHEUS_CONFIG.name, cwd=PROMETHEUS_CONFIG.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(RULE_FILES)} rule files found" in done.stdout + done.stderr


def test_rules_are_valid(promtool: str):
    assert RULE_FILES
    done = run(promtool, "check", "rules", *map(str, RULE_FILES), cwd=RULES_DIR)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass(promtool: str):
    assert RULE_TESTS
    done = run(promtool, "test", "rules", *(path.name for path in RULE_TESTS), cwd=RULE_TESTS[0].parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_test_that_makes_it_fire():
    alerts = {rule["alert"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    assert {"FleetstreamWorkerDown", "FleetstreamConsumerLagGrowing", "FleetstreamDeadLetterRateHigh",
            "FleetstreamEventLagHigh", "FleetstreamNoInput"} <= alerts
    fired, quiet = set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fired == alerts
    assert quiet == alerts  # and a case where each stays quiet


def test_rule_unit_tests_fail_on_a_wrong_expectation(promtool: str, tmp_path: Path):
    """Expect the no-input alert to stay quiet where the shipped test expects it to fire: promtool says no."""
    suite = yaml.safe_load(RULE_TESTS[0].read_text())
    suite["rule_files"] = [str((RULE_TESTS[0].parent / name).resolve()) for name in suite["rule_files"]]
    flipped = 0
    for case in suite["tests"]:
        for check in case.get("alert_rule_test", []):
            if check["alertname"] == "FleetstreamNoInput" and check["exp_alerts"]:
                check["exp_alerts"] = []
                flipped += 1
    assert flipped
    wrong = tmp_path / "wrong_test.yml"
    wrong.write_text(yaml.safe_dump(suite))
    done = run(promtool, "test", "rules", wrong.name, cwd=tmp_path)
    assert done.returncode != 0
    assert "FleetstreamNoInput" in done.stdout + done.stderr
