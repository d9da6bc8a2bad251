"""The real sync server in a subprocess (the simulator's: one implementation) and moving a
round's deadline past in its database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, bindparam, create_engine, text

from trainer.simulation.server import ServerProcess

__all__ = ["ServerProcess", "pass_deadline"]


def pass_deadline(database_url: str, round_id: str, column: str = "deadline") -> None:
    """Move a round's ``deadline`` (or ``stage_deadline``) a second into the past in the
    server's database, as if the clock had run on: the server meets it at its next request
    by its own clock comparison. Tests use this instead of a short deadline that their own
    steps would have to beat, so the outcome does not depend on how fast the machine is."""
    assert column in ("deadline", "stage_deadline"), column
    past = datetime.now(UTC) - timedelta(seconds=1)
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            changed = connection.execute(
                text(f"UPDATE rounds SET {column} = :past WHERE id = :round_id").bindparams(
                    bindparam("past", type_=DateTime(timezone=True))),
                {"past": past, "round_id": round_id}).rowcount
    finally:
        engine.dispose()
    assert changed == 1, f"no round {round_id}"
