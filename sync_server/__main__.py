"""``python -m sync_server``: the development server (see ``sync_server.dev_server``)."""

from __future__ import annotations

import argparse
import sys

from sync_server.dev_server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sync_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--data-dir", help="overrides DATA_DIR")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
