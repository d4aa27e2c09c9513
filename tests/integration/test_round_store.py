"""The aggregator's round store on real databases: SQLite always, PostgreSQL when RAFFM_TEST_POSTGRES_URL is set.

The schema comes from the Alembic migrations (applied at start and by ``raffm aggregator migrate``), in its own
version table so the registry's migrations can live in the same database.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import sqlalchemy as sa

from services.aggregator.db import DATABASE, VERSION_TABLE
from services.aggregator.store import (
    ASSIGNED, CLOSED, OPEN, UPLOADED, AssignmentRecord, DuplicateUpdateError, JobRecord, RoundRecord, RoundStore,
    SqlRoundStore, UpdateRecord, round_store_from_url,
)

AGG_TABLES = {"agg_jobs", "agg_rounds", "agg_assignments", "agg_updates"}


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_migrations_build_the_schema_the_store_queries(sql_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from services.aggregator.store import METADATA

    engine = DATABASE.engine(sql_url)
    try:
        assert DATABASE.current_revision(engine) is None
        assert DATABASE.migrate(engine) == DATABASE.head_revision() is not None
        assert DATABASE.migrate(engine) == DATABASE.head_revision()  # idempotent
        assert AGG_TABLES | {VERSION_TABLE} <= _tables(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}), METADATA)
        assert diff == [], diff
    finally:
        engine.dispose()


def test_the_registry_and_the_aggregator_share_one_database(sql_url: str) -> None:
    from services.registry.db import VERSION_TABLE as REGISTRY_VERSION_TABLE
    from services.registry.db import DATABASE as REGISTRY_DATABASE

    reg = REGISTRY_DATABASE.engine(sql_url)
    try:
        REGISTRY_DATABASE.migrate(reg)
    finally:
        reg.dispose()
    store = SqlRoundStore(sql_url)
    try:
        tables = _tables(store.engine)
        assert {VERSION_TABLE, REGISTRY_VERSION_TABLE, "devices"} | AGG_TABLES <= tables
        assert store.revision == DATABASE.head_revision()
    finally:
        store.close()


def test_cli_migrate(sql_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from raffm_app.cli import main

    assert main(["aggregator", "migrate", "--db", sql_url]) == 0
    assert f"revision {DATABASE.head_revision()}" in capsys.readouterr().out
    engine = DATABASE.engine(sql_url)
    try:
        assert DATABASE.current_revision(engine) == DATABASE.head_revision() and AGG_TABLES <= _tables(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=["memory", "sql"])
def store(request: pytest.FixtureRequest, sql_url: str) -> RoundStore:
    s = round_store_from_url("memory://" if request.param == "memory" else sql_url)
    yield s
    s.close()


def test_round_store_round_trip(store: RoundStore) -> None:
    job = JobRecord("job", {"rounds": 2, "eval_fractions": [0.5, 1.0]}, "running", 1, "job-v0", 1.5)
    store.save_job(job)
    assert store.get_job("job") == job and store.get_job("other") is None
    rnd = RoundRecord("job-r1", "job", 1, OPEN, "job-v0", 10.0, 70.0, 2)
    store.add_round(rnd)
    rnd.bytes_down = 5 << 30  # beyond 32 bits
    rnd.evaluation = {"accuracy": 0.75, "accuracy@0.25": 0.5}
    rnd.state = CLOSED
    store.save_round(rnd)
    assert store.get_round("job-r1") == rnd
    store.add_round(RoundRecord("job-r2", "job", 2, OPEN, "job-v1", 80.0, 140.0, 2))
    assert [r.round_id for r in store.list_rounds("job")] == ["job-r1", "job-r2"]

    a = AssignmentRecord("t1", "job-r2", "dev-a", "phone", {"hidden": 8}, ASSIGNED, 81.0, 1234)
    store.add_assignment(a)
    store.add_assignment(AssignmentRecord("t2", "job-r2", "dev-b", "laptop", {"hidden": 32}, ASSIGNED, 82.0, 99))
    store.save_assignment(AssignmentRecord("t1", "job-r2", "dev-a", "phone", {"hidden": 8}, UPLOADED, 81.0, 1234))
    assert store.get_assignment("t1").state == UPLOADED
    assert [x.ticket_id for x in store.assignments("job-r2")] == ["t1", "t2"]
    assert sorted(store.assignment_states("job-r2")) == [("dev-a", UPLOADED), ("dev-b", ASSIGNED)]
    assert store.assignment_states("job-r1") == []

    # An update commits with its assignment and its round as they are with it, or not at all.
    r2 = store.get_round("job-r2")
    b_done = replace(store.get_assignment("t2"), state=UPLOADED, report={"peak_mb": 12.0})
    u1 = store.commit_update(UpdateRecord("job-r2", "t2", "dev-b", 7, "/s/t2", 3 << 30, {"loss": 0.5}, 90.0),
                             b_done, replace(r2, bytes_up=3 << 30))
    assert store.get_assignment("t2") == b_done and store.get_round("job-r2").bytes_up == 3 << 30
    u2 = store.commit_update(UpdateRecord("job-r2", "t1", "dev-a", 3, "/s/t1", 10, {}, 91.0),
                             store.get_assignment("t1"), replace(r2, bytes_up=(3 << 30) + 10))
    assert 0 < u1.seq < u2.seq
    with pytest.raises(DuplicateUpdateError):
        store.commit_update(UpdateRecord("job-r2", "t1", "dev-a", 3, "/s/t1", 10, {}, 92.0),
                            replace(b_done, report={}), replace(r2, bytes_up=1, state=CLOSED))
    assert store.get_assignment("t2") == b_done  # the refused commit wrote nothing
    assert store.get_round("job-r2") == replace(r2, bytes_up=(3 << 30) + 10)
    assert [u.ticket_id for u in store.updates("job-r2")] == ["t2", "t1"]  # commit order
    assert store.update_for_ticket("t2") == u1 and store.update_for_ticket("t3") is None


def test_one_assignment_per_device_and_round_is_a_database_constraint(sql_url: str) -> None:
    store = SqlRoundStore(sql_url)
    try:
        store.save_job(JobRecord("job", {}, "running", 1, "job-v0", 0.0))
        store.add_round(RoundRecord("job-r1", "job", 1, OPEN, "job-v0", 0.0, 60.0, 1))
        store.add_assignment(AssignmentRecord("t1", "job-r1", "dev-a", "phone", {}, ASSIGNED, 1.0))
        with pytest.raises(sa.exc.IntegrityError):
            store.add_assignment(AssignmentRecord("t2", "job-r1", "dev-a", "phone", {}, ASSIGNED, 2.0))
    finally:
        store.close()
