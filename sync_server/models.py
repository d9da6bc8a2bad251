"""The database schema (SQLAlchemy 2.0 typed models). Every change needs an Alembic
revision in ``migrations/versions``; ``tests/test_migrations.py`` checks they agree.

Types are portable (SQLite by default, PostgreSQL by URL): LargeBinary, JSON,
DateTime(timezone=True), always written in UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands DateTime(timezone=True) back naive; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Device(Base):
    """A registered device: its id is derived from its Ed25519 public key."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Indexed: retention prunes devices silent past DEVICE_RETENTION_DAYS by it.
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                   index=True)
    # The model version reported at the latest check-in (None: none yet, or none held).
    model_version: Mapped[int | None] = mapped_column(Integer)


class EnrollmentToken(Base):
    """A one-time enrollment token (``sync_server.enrollment``): only its SHA-256 digest;
    ``used_at`` / ``device_id`` once it registered a device."""

    __tablename__ = "enrollment_tokens"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    device_id: Mapped[str | None] = mapped_column(String(32))


class RateLimitCounter(Base):
    """A fixed-window rate-limit counter (``sync_server.rate_limit.DatabaseStorage``): hits
    in the window ending at ``expires_at`` (epoch seconds). Expired rows are deleted."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    hits: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


class Nonce(Base):
    """A request nonce seen from a device; the primary key makes a replay an insert conflict,
    atomic across workers. Rows older than 2 x MAX_SKEW_S are pruned."""

    __tablename__ = "nonces"

    device_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ModelVersion(Base):
    """One published model: the exact signed manifest bytes and the bundle zip's blob.
    ``status`` published|paused (a paused version is never served); ``rollout_percent``
    (0-100) is the share of devices offered it (``sync_server.registry.in_rollout``)."""

    __tablename__ = "model_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    blob_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="published")  # published|paused
    rollout_percent: Mapped[int] = mapped_column(Integer, default=100, server_default="100")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelMetric(Base):
    """One evaluation number for a version, e.g. ``hr@10`` = 0.12 from source ``offline``
    (held-out data) or ``online`` (what devices saw). One row per (version, source, name):
    a later post replaces the value (``sync_server.model_metrics``)."""

    __tablename__ = "model_metrics"
    __table_args__ = (UniqueConstraint("version", "source", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(32), default="offline", server_default="offline")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Round(Base):
    """A federated round: state machine open -> collecting -> aggregating -> published |
    failed (``sync_server.rounds``). ``config`` is the normalised round config (defaults
    filled in, plus the ``expected_shapes`` of the update). The counters move in the same
    transaction as the Selection / Update row they count, through conditional UPDATEs, so
    concurrent workers never over-select or double-count. ``claim`` + ``lease_until`` belong
    to the worker aggregating the round: only the claim holder may publish it, and a claim
    whose lease ran out (the worker died) is taken over."""

    __tablename__ = "rounds"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deadline: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model_version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"))
    sampling_rate: Mapped[float | None] = mapped_column(Float)
    selected_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    received_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claim: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str | None] = mapped_column(Text)
    measurements: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    published_version: Mapped[int | None] = mapped_column(Integer)
    strategy_state_sha256: Mapped[str | None] = mapped_column(String(64))
    # SecAgg+ rounds: graph parameters fixed when advertising closes (degree, threshold,
    # graph seed, expected answers in the current stage), and the current stage's deadline.
    secagg: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    stage_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Selection(Base):
    """A device sampled into a round at check-in (one row per device per round)."""

    __tablename__ = "selections"

    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    selected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SelectionCoin(Base):
    """The coin flipped for a device that checked in for a round (``sync_server.selection``):
    one row per device per round, so checking in again never flips another. ``selected``
    is the outcome; ``model_version`` the base version the device reported holding."""

    __tablename__ = "selection_coins"

    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    selected: Mapped[bool] = mapped_column(Boolean)
    model_version: Mapped[int] = mapped_column(Integer)
    flipped_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Update(Base):
    """An accepted, validated update: its plaintext PRT1 frame is a blob (see
    ``sync_server.upload_schemes.SealedRounds.accept`` for why plaintext), one per device
    per round."""

    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("round_id", "device_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    blob_sha256: Mapped[str] = mapped_column(String(64))
    num_examples: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # sealed bytes
    norm: Mapped[float | None] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LedgerRow(Base):
    """What the accountant needs per round: one row per noised aggregation."""

    __tablename__ = "privacy_ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), unique=True)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sampling_rate: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    # "central": the server noised the sum; "distributed": devices added discrete Gaussian
    # noise inside secure aggregation (noise_multiplier is then the effective one).
    mode: Mapped[str] = mapped_column(String(16), default="central", server_default="central")
    # What the accountant composed for this round ("poisson_sampled_gaussian", or "gaussian"
    # when q = 1) and which accountant computed ``epsilon`` ("pld" | "rdp"; rows written
    # before revision 0007 were opacus' RDP).
    mechanism: Mapped[str] = mapped_column(String(32), default="poisson_sampled_gaussian",
                                           server_default="poisson_sampled_gaussian")
    accountant: Mapped[str] = mapped_column(String(16), default="pld", server_default="rdp")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SecAggMember(Base):
    """A device in a SecAgg+ round from its key advertisement on; the timestamps say which
    stages it answered (U1 advertised, U2 shared_at, U3 masked_at, U4 unmasked_at). The
    masked input blob and the revealed shares are deleted when the round ends."""

    __tablename__ = "secagg_members"

    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    advert: Mapped[dict[str, Any]] = mapped_column(JSON)
    advertised_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    shared_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    masked_sha256: Mapped[str | None] = mapped_column(String(64))
    masked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reveal: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    unmasked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SecAggShare(Base):
    """One encrypted share relayed from ``sender`` to ``recipient`` (the server cannot read
    it); keyed recipient-first because that is how devices fetch them."""

    __tablename__ = "secagg_shares"

    round_id: Mapped[str] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    recipient: Mapped[str] = mapped_column(String(32), primary_key=True)
    sender: Mapped[str] = mapped_column(String(32), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)
