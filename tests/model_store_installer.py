"""Kill-test helper: install every zip in DIR (named v<version>.zip) above the store's highest
version, in order, printing each version after its install returns. Run by test_model_store."""

import sys
from pathlib import Path

# This checkout first (not whatever copy of the package is installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_sdk.model_store import ModelStore  # noqa: E402


def main(root: str, key_hex: str, zips: str) -> None:
    store = ModelStore(root, bytes.fromhex(key_hex))
    for path in sorted(Path(zips).glob("v*.zip"), key=lambda p: int(p.stem[1:])):
        if int(path.stem[1:]) > store.highest_version:
            store.install(path.read_bytes())
            print(path.stem[1:], flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
