"""PocketRec's test suite. A package so that its helpers import by one name,
``tests.support``, from test modules, conftest.py and the server subprocess alike."""
