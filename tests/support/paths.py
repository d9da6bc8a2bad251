"""Where things are: the checkout the tests run in and the real data set beside it."""

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
# The helper scripts a test runs as a process of its own (python SUPPORT / "<name>.py").
SUPPORT = Path(__file__).resolve().parent
# The Online Retail data set (read in place, never copied into the repository).
ONLINE_RETAIL = REPO.parent / "shared" / "data" / "online_retail.csv.gz"


def bench_module(name: str) -> ModuleType:
    """bench/<name>.py imported as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
