"""The README's main command, as a user runs it: `fleetstream demo` on the embedded broker shows fixes flowing.

(The other README command, `pip install -e ".[dev]" && pytest`, is what .ci/run executes from a clean clone.)
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.e2e


def test_fleetstream_demo_runs_on_the_embedded_broker():
    command = shutil.which("fleetstream")
    assert command, "the fleetstream console script is installed by pip install -e"
    done = subprocess.run([command, "demo", "--duration", "20", "--rate", "1000"], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "embedded Tansu broker on kafka://127.0.0.1:" in done.stdout
    rates = [int(m.group(1).replace(",", "")) for m in re.finditer(r"out\s+([\d,]+)/s", done.stdout)]
    assert rates and max(rates) > 0, done.stdout[-2000:]
    dead = [int(m.group(1).replace(",", "")) for m in re.finditer(r"dead letters\s+([\d,]+)", done.stdout)]
    assert dead and dead[-1] > 0  # the simulator's malformed share reaches the dead-letter topic
    assert "stopping" in done.stdout
