"""A publisher for the server subprocess in tests: the weights-only publish, held until the
file named by ``TEST_PUBLISH_GATE`` exists, so a test can look at a round while
its aggregation is still running."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sync_server.registry import republish_weights


def publish(weights, base_bundle_dir, version, provenance):  # a sync_server Publisher
    gate = Path(os.environ["TEST_PUBLISH_GATE"])
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return republish_weights(weights, base_bundle_dir, version, provenance)
