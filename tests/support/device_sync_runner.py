"""Kill-test helper: open a DeviceClient on DIR, print "ready", sync once (no training)
against URL, then print "synced <model_version> <installed> <install_error>". Run by
test_device_faults, which SIGKILLs it while the sync is under way.

    python tests/support/device_sync_runner.py DIR SERVER_KEY_HEX URL [STEP]

With STEP (one of ``INSTALL_STEPS``) the model install stops right after that step: the
runner prints "paused STEP" and blocks until the test kills it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout first (not whatever copy of the package is installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from device_sdk.device_client import DeviceClient  # noqa: E402
from device_sdk.model_store import INSTALL_STEPS  # noqa: E402


def main(data_dir: str, key_hex: str, url: str, pause_step: str = "") -> None:
    assert pause_step in ("", *INSTALL_STEPS), pause_step

    def pause(step: str) -> None:
        if step == pause_step:
            print("paused", step, flush=True)
            sys.stdin.read()  # blocks: the test SIGKILLs this process now

    with DeviceClient(data_dir, server_key=bytes.fromhex(key_hex), server_url=url) as device:
        device.models.on_step = pause
        print("ready", flush=True)
        report = device.sync(train=False)
        print("synced", report.model_version, report.installed, report.install_error,
              flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
