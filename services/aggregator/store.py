"""The round store: jobs, rounds, assignments and accepted updates. SQL (SQLite default, PostgreSQL) or memory.

An accepted update's row is the commit point of an upload: its tensors are fsynced in the staging directory first,
and the row's ``seq`` (a monotonically increasing id) is the order in which updates were folded, which a restarted
aggregator replays to rebuild the open round bit for bit.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol
from urllib.parse import urlparse

import sqlalchemy as sa

# Round states (mirrors raffm.v1.RoundState).
OPEN, AGGREGATING, CLOSED, FAILED = "open", "aggregating", "closed", "failed"
# Assignment states.
ASSIGNED, UPLOADED, DROPPED = "assigned", "uploaded", "dropped"


@dataclass
class JobRecord:
    job_id: str
    config: dict[str, Any]
    state: str  # pending | running | completed | failed
    current_round: int
    model_version: str
    created_at: float


@dataclass
class RoundRecord:
    round_id: str
    job_id: str
    index: int
    state: str
    model_version: str
    opened_at: float
    deadline: float
    quorum: int
    result_version: str = ""
    closed_at: float = 0.0
    extensions: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    full_model_bytes: int = 0  # what full-model FedAvg would have moved for the same participants (down + up)
    rejected: int = 0
    dropped: int = 0
    mean_train_loss: float = 0.0
    evaluation: dict[str, Any] = field(default_factory=dict)
    # Why devices could not take part, by reason (ReportFailure's, or "no_fit"): {"data": {"devices": 2,
    # "detail": "<latest>"}}.
    failures: dict[str, Any] = field(default_factory=dict)


@dataclass
class AssignmentRecord:
    ticket_id: str
    round_id: str
    device_id: str
    tier: str
    spec: dict[str, Any]
    state: str
    created_at: float
    download_bytes: int = 0
    # Closed-loop sizing: the plan's predictions with the declared profile they were made for, and what the device
    # reported with its upload (raffm.calibration.observe reads both).
    predicted: dict[str, float] = field(default_factory=dict)
    report: dict[str, float] = field(default_factory=dict)


@dataclass
class UpdateRecord:
    round_id: str
    ticket_id: str
    device_id: str
    sample_count: int
    path: str
    nbytes: int
    metrics: dict[str, Any]
    accepted_at: float
    seq: int = 0


class RoundStore(Protocol):
    def get_job(self, job_id: str) -> JobRecord | None: ...
    def save_job(self, job: JobRecord) -> None: ...
    def add_round(self, rnd: RoundRecord) -> None: ...
    def get_round(self, round_id: str) -> RoundRecord | None: ...
    def save_round(self, rnd: RoundRecord) -> None: ...
    def list_rounds(self, job_id: str) -> list[RoundRecord]:
        """Oldest first."""
    def add_assignment(self, a: AssignmentRecord) -> None: ...
    def get_assignment(self, ticket_id: str) -> AssignmentRecord | None: ...
    def save_assignment(self, a: AssignmentRecord) -> None: ...
    def assignments(self, round_id: str) -> list[AssignmentRecord]: ...
    def assignment_states(self, round_id: str) -> list[tuple[str, str]]:
        """(device_id, state) of every assignment of the round: what counting and settling a round need, without
        decoding every assignment's spec and plan (a round of hundreds is settled after every upload)."""
    def commit_update(self, u: UpdateRecord, assignment: AssignmentRecord, rnd: RoundRecord) -> UpdateRecord:
        """Commit an accepted update together with its assignment and its round as they are with it (uploaded,
        counted): one transaction, so a crash never leaves an update folded at restart whose device the round
        still counts as owing it. Returns the update with its ``seq``; a second update for one ticket is refused
        (``DuplicateUpdateError``, nothing written)."""
    def updates(self, round_id: str) -> list[UpdateRecord]:
        """In commit (``seq``) order."""
    def update_for_ticket(self, ticket_id: str) -> UpdateRecord | None: ...
    def close(self) -> None: ...


class DuplicateUpdateError(Exception):
    pass


class MemoryRoundStore:
    """Everything in dicts, copies in and out; for tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}
        self._rounds: dict[str, RoundRecord] = {}
        self._assignments: dict[str, AssignmentRecord] = {}
        self._updates: dict[str, UpdateRecord] = {}
        self._seq = 0

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return copy.deepcopy(self._jobs.get(job_id))

    def save_job(self, job: JobRecord) -> None:
        with self._lock:
            self._jobs[job.job_id] = copy.deepcopy(job)

    def add_round(self, rnd: RoundRecord) -> None:
        self.save_round(rnd)

    def get_round(self, round_id: str) -> RoundRecord | None:
        with self._lock:
            return copy.deepcopy(self._rounds.get(round_id))

    def save_round(self, rnd: RoundRecord) -> None:
        with self._lock:
            self._rounds[rnd.round_id] = copy.deepcopy(rnd)

    def list_rounds(self, job_id: str) -> list[RoundRecord]:
        with self._lock:
            return [copy.deepcopy(r) for r in sorted(self._rounds.values(), key=lambda r: r.index) if r.job_id == job_id]

    def add_assignment(self, a: AssignmentRecord) -> None:
        self.save_assignment(a)

    def get_assignment(self, ticket_id: str) -> AssignmentRecord | None:
        with self._lock:
            return copy.deepcopy(self._assignments.get(ticket_id))

    def save_assignment(self, a: AssignmentRecord) -> None:
        with self._lock:
            self._assignments[a.ticket_id] = copy.deepcopy(a)

    def assignments(self, round_id: str) -> list[AssignmentRecord]:
        with self._lock:
            return [copy.deepcopy(a) for a in self._assignments.values() if a.round_id == round_id]

    def assignment_states(self, round_id: str) -> list[tuple[str, str]]:
        with self._lock:
            return [(a.device_id, a.state) for a in self._assignments.values() if a.round_id == round_id]

    def commit_update(self, u: UpdateRecord, assignment: AssignmentRecord, rnd: RoundRecord) -> UpdateRecord:
        with self._lock:
            if u.ticket_id in self._updates:
                raise DuplicateUpdateError(u.ticket_id)
            self._seq += 1
            rec = replace(u, seq=self._seq)
            self._updates[u.ticket_id] = rec
            self._assignments[assignment.ticket_id] = copy.deepcopy(assignment)
            self._rounds[rnd.round_id] = copy.deepcopy(rnd)
            return copy.deepcopy(rec)

    def updates(self, round_id: str) -> list[UpdateRecord]:
        with self._lock:
            return sorted((copy.deepcopy(u) for u in self._updates.values() if u.round_id == round_id),
                          key=lambda u: u.seq)

    def update_for_ticket(self, ticket_id: str) -> UpdateRecord | None:
        with self._lock:
            return copy.deepcopy(self._updates.get(ticket_id))

    def close(self) -> None:
        pass


# The query-side description of the tables; the schema itself is created by the Alembic migrations
# (services/aggregator/migrations), and tests/integration/test_round_store.py checks the two agree.
_meta = METADATA = sa.MetaData(naming_convention={
    "pk": "pk_%(table_name)s", "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s", "ix": "ix_%(column_0_label)s"})
_jobs = sa.Table(
    "agg_jobs", _meta,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("current_round", sa.Integer, nullable=False),
    sa.Column("model_version", sa.String(160), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
_rounds = sa.Table(
    "agg_rounds", _meta,
    sa.Column("round_id", sa.String(160), primary_key=True),
    sa.Column("job_id", sa.String(128), sa.ForeignKey("agg_jobs.job_id"), nullable=False, index=True),
    sa.Column("index", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("model_version", sa.String(160), nullable=False),
    sa.Column("opened_at", sa.Float, nullable=False),
    sa.Column("deadline", sa.Float, nullable=False),
    sa.Column("quorum", sa.Integer, nullable=False),
    sa.Column("result_version", sa.String(160), nullable=False),
    sa.Column("closed_at", sa.Float, nullable=False),
    sa.Column("extensions", sa.Integer, nullable=False),
    sa.Column("bytes_down", sa.BigInteger, nullable=False),
    sa.Column("bytes_up", sa.BigInteger, nullable=False),
    sa.Column("full_model_bytes", sa.BigInteger, nullable=False),
    sa.Column("rejected", sa.Integer, nullable=False),
    sa.Column("dropped", sa.Integer, nullable=False),
    sa.Column("mean_train_loss", sa.Float, nullable=False),
    sa.Column("evaluation", sa.JSON, nullable=False),
    sa.Column("failures", sa.JSON, nullable=False),
    sa.UniqueConstraint("job_id", "index"),
)
_assignments = sa.Table(
    "agg_assignments", _meta,
    sa.Column("ticket_id", sa.String(64), primary_key=True),
    sa.Column("round_id", sa.String(160), sa.ForeignKey("agg_rounds.round_id"), nullable=False, index=True),
    sa.Column("device_id", sa.String(128), nullable=False),
    sa.Column("tier", sa.String(32), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("download_bytes", sa.BigInteger, nullable=False),
    sa.Column("predicted", sa.JSON, nullable=False, server_default="{}"),
    sa.Column("report", sa.JSON, nullable=False, server_default="{}"),
    sa.UniqueConstraint("round_id", "device_id"),
)
_updates = sa.Table(
    "agg_updates", _meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("round_id", sa.String(160), sa.ForeignKey("agg_rounds.round_id"), nullable=False, index=True),
    sa.Column("ticket_id", sa.String(64), nullable=False, unique=True),
    sa.Column("device_id", sa.String(128), nullable=False),
    sa.Column("sample_count", sa.BigInteger, nullable=False),
    sa.Column("path", sa.String(1024), nullable=False),
    sa.Column("nbytes", sa.BigInteger, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("accepted_at", sa.Float, nullable=False),
)


def _row(cls: type, row: Any) -> Any:
    data = dict(row._mapping)
    return cls(**{f.name: data[f.name] for f in fields(cls)})


def _values(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in skip}


class SqlRoundStore:
    """SQLAlchemy Core over SQLite or PostgreSQL (tables prefixed ``agg_``), migrated to the latest schema on open."""

    def __init__(self, url: str, *, auto_migrate: bool = True) -> None:
        from services.aggregator.db import DATABASE

        self.engine = DATABASE.engine(url)
        self.revision = DATABASE.migrate(self.engine) if auto_migrate else None

    def _upsert(self, table: sa.Table, key: str, values: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            _upsert(conn, table, key, values)

    def _one(self, table: sa.Table, cls: type, key: str, value: str) -> Any:
        with self.engine.connect() as conn:
            row = conn.execute(table.select().where(table.c[key] == value)).first()
        return None if row is None else _row(cls, row)

    def get_job(self, job_id: str) -> JobRecord | None:
        return self._one(_jobs, JobRecord, "job_id", job_id)

    def save_job(self, job: JobRecord) -> None:
        self._upsert(_jobs, "job_id", _values(job))

    def add_round(self, rnd: RoundRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(_rounds.insert().values(**_values(rnd)))

    def get_round(self, round_id: str) -> RoundRecord | None:
        return self._one(_rounds, RoundRecord, "round_id", round_id)

    def save_round(self, rnd: RoundRecord) -> None:
        self._upsert(_rounds, "round_id", _values(rnd))

    def list_rounds(self, job_id: str) -> list[RoundRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(_rounds.select().where(_rounds.c.job_id == job_id).order_by(_rounds.c.index)).all()
        return [_row(RoundRecord, r) for r in rows]

    def add_assignment(self, a: AssignmentRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(_assignments.insert().values(**_values(a)))

    def get_assignment(self, ticket_id: str) -> AssignmentRecord | None:
        return self._one(_assignments, AssignmentRecord, "ticket_id", ticket_id)

    def save_assignment(self, a: AssignmentRecord) -> None:
        self._upsert(_assignments, "ticket_id", _values(a))

    def assignments(self, round_id: str) -> list[AssignmentRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(_assignments.select().where(_assignments.c.round_id == round_id)
                                .order_by(_assignments.c.created_at)).all()
        return [_row(AssignmentRecord, r) for r in rows]

    def assignment_states(self, round_id: str) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(_assignments.c.device_id, _assignments.c.state)
                                .where(_assignments.c.round_id == round_id)).all()
        return [(str(device), str(state)) for device, state in rows]

    def commit_update(self, u: UpdateRecord, assignment: AssignmentRecord, rnd: RoundRecord) -> UpdateRecord:
        with self.engine.begin() as conn:
            try:
                res = conn.execute(_updates.insert().values(**_values(u, skip=("seq",))))
            except sa.exc.IntegrityError as exc:  # the ticket's unique key: raising rolls the transaction back
                raise DuplicateUpdateError(u.ticket_id) from exc
            key = res.inserted_primary_key
            assert key is not None  # an INSERT into a table with an autoincrement primary key
            _upsert(conn, _assignments, "ticket_id", _values(assignment))
            _upsert(conn, _rounds, "round_id", _values(rnd))
        return replace(u, seq=int(key[0]))

    def updates(self, round_id: str) -> list[UpdateRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(_updates.select().where(_updates.c.round_id == round_id).order_by(_updates.c.seq)).all()
        return [_row(UpdateRecord, r) for r in rows]

    def update_for_ticket(self, ticket_id: str) -> UpdateRecord | None:
        return self._one(_updates, UpdateRecord, "ticket_id", ticket_id)

    def close(self) -> None:
        self.engine.dispose()


def _upsert(conn: sa.Connection, table: sa.Table, key: str, values: dict[str, Any]) -> None:
    res = conn.execute(table.update().where(table.c[key] == values[key]).values(**values))
    if res.rowcount == 0:
        conn.execute(table.insert().values(**values))


def round_store_from_url(url: str) -> RoundStore:
    """``memory://`` or a SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://...``)."""
    if urlparse(url).scheme == "memory":
        return MemoryRoundStore()
    return SqlRoundStore(url)


def now() -> float:
    return time.time()
