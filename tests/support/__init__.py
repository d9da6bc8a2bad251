"""What the tests share besides fixtures (those are in tests/conftest.py). No tests here.

    paths.py                 REPO, ONLINE_RETAIL
    bundles.py               zip_bundle, copy_bundle, resign_bundle, public_raw
    server.py                the real sync server in a subprocess and the requests tests make:
                             ADMIN, SETTINGS, publish, open_round, settled, pass_deadline,
                             sync_client, make_device, weights_of, drive (SecAgg+ steps), ...
    protocol_server.py       a minimal stdlib /v1 server for the SDK's tests
    postgres.py              a private real PostgreSQL server (REQUIRE_POSTGRES in CI)
    gated_publisher.py       a publisher the server subprocess loads (GATED_PUBLISHER) that
                             holds a round's publish until the test opens a gate
    device_sync_runner.py    scripts a test runs as a process and SIGKILLs mid-way
    event_log_writer.py      (``python tests/support/<name>.py ...``; each puts the checkout
    model_store_installer.py first on its path itself)
"""
