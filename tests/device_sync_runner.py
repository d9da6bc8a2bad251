"""Kill-test helper: open a DeviceClient on DIR, print "ready", sync once (no training)
against URL, then print "synced <model_version> <installed> <install_error>". Run by
test_device_faults, which SIGKILLs it while the sync is under way.

    python tests/device_sync_runner.py DIR SERVER_KEY_HEX URL
"""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout first (not whatever copy of the package is installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_sdk.device_client import DeviceClient  # noqa: E402


def main(data_dir: str, key_hex: str, url: str) -> None:
    with DeviceClient(data_dir, server_key=bytes.fromhex(key_hex), server_url=url) as device:
        print("ready", flush=True)
        report = device.sync(train=False)
        print("synced", report.model_version, report.installed, report.install_error,
              flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
