"""Kill-test helper: install every zip in DIR (named v<version>.zip) above the store's highest
version, in order, printing each version after its install returns. Run by test_model_store.

    python tests/support/model_store_installer.py ROOT KEY_HEX DIR [STEP N]

With STEP and N, the N-th install this process starts stops right after it passes STEP (one
of ``INSTALL_STEPS``): it prints "paused STEP VERSION" and blocks until the test kills it, so
the kill lands exactly there, however fast or slow the machine is."""

import sys
from pathlib import Path

# This checkout first (not whatever copy of the package is installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from device_sdk.model_store import INSTALL_STEPS, ModelStore  # noqa: E402


def main(root: str, key_hex: str, zips: str, pause_step: str = "", pause_at: str = "0") -> None:
    assert pause_step in ("", *INSTALL_STEPS), pause_step
    store = ModelStore(root, bytes.fromhex(key_hex))
    started = 0
    for path in sorted(Path(zips).glob("v*.zip"), key=lambda p: int(p.stem[1:])):
        if int(path.stem[1:]) > store.highest_version:
            started += 1

            def pause(step: str, version: str = path.stem[1:], n: int = started) -> None:
                if step == pause_step and n == int(pause_at):
                    print("paused", step, version, flush=True)
                    sys.stdin.read()  # blocks: the test SIGKILLs this process now

            store.on_step = pause
            store.install(path.read_bytes())
            print(path.stem[1:], flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
