"""Where things are: the checkout the tests run in and the real data set beside it."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The helper scripts a test runs as a process of its own (python SUPPORT / "<name>.py").
SUPPORT = Path(__file__).resolve().parent
# The Online Retail data set (read in place, never copied into the repository).
ONLINE_RETAIL = REPO.parent / "shared" / "data" / "online_retail.csv.gz"
