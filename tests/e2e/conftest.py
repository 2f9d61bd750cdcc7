"""End-to-end tests that need a real broker reuse the integration fixtures (a real Tansu broker on a free port,
a private topic prefix per test)."""

from tests.integration.conftest import broker, log_dir, prefix  # noqa: F401  (pytest finds fixtures by name)
