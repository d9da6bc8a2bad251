"""The development server (threaded werkzeug), for ``pocketrec serve`` and
``python -m sync_server``. Prints ``listening on http://HOST:PORT`` once the socket is bound,
so port 0 (a free port) works for scripts and tests. Production runs gunicorn."""

from __future__ import annotations

import logging

from werkzeug.serving import make_server

from sync_server.app import create_app


def serve(host: str = "127.0.0.1", port: int = 8080, data_dir: str | None = None) -> None:
    """Run the development server until interrupted. Not for production: use gunicorn."""
    app = create_app({"DATA_DIR": data_dir} if data_dir else None)
    # The app writes its own access log (``sync_server.access``); werkzeug's would repeat
    # it in another format. Its warnings and errors go out through the app's handler.
    werkzeug_log = logging.getLogger("werkzeug")
    werkzeug_log.setLevel(logging.WARNING)
    for handler in logging.getLogger("sync_server").handlers:
        if getattr(handler, "_pocketrec", False) and handler not in werkzeug_log.handlers:
            werkzeug_log.addHandler(handler)
    server = make_server(host, port, app, threaded=True)
    print(f"listening on http://{host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
