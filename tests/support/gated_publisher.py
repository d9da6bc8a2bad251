"""A publisher for the server subprocess in tests: the weights-only publish, held until the
file named by ``TEST_PUBLISH_GATE`` exists, so a test can look at a round (or kill the
server) while its aggregation is still running.

``TEST_PUBLISH_HOLD``: ``before`` (default) holds before anything is written; ``after``
writes the new (unsigned) bundle first, then holds. Reaching the hold touches
``<gate>.reached``, so a test knows the server is there."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sync_server.registry import republish_weights


def publish(weights, base_bundle_dir, version, provenance):  # a sync_server Publisher
    gate = Path(os.environ["TEST_PUBLISH_GATE"])
    written = None
    if os.environ.get("TEST_PUBLISH_HOLD", "before") == "after":
        written = republish_weights(weights, base_bundle_dir, version, provenance)
    gate.with_name(gate.name + ".reached").touch()
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return written or republish_weights(weights, base_bundle_dir, version, provenance)
