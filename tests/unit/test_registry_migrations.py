"""Schema migrations: they reach head, match the ORM models, are idempotent, and run from the CLI."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from raffm_app.cli import main as raffm_main
from services.registry.db import DATABASE, VERSION_TABLE
from services.registry.models import Base


def test_migrations_match_the_models_and_are_idempotent(sql_url):
    engine = DATABASE.engine(sql_url)
    try:
        assert DATABASE.current_revision(engine) is None
        assert DATABASE.migrate(engine) == DATABASE.head_revision() == "0001"
        assert DATABASE.migrate(engine) == "0001"  # second run is a no-op
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            diff = [d for d in compare_metadata(ctx, Base.metadata)
                    if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)]
        assert diff == []
        tables = set(inspect(engine).get_table_names())
        assert {"fleets", "devices", "device_profiles", "device_tokens", VERSION_TABLE} <= tables
    finally:
        engine.dispose()


def test_migrate_command(tmp_path, capsys):
    db = tmp_path / "sub" / "registry.db"
    assert raffm_main(["registry", "migrate", "--db", f"sqlite:///{db}"]) == 0
    assert "revision 0001" in capsys.readouterr().out and db.exists()
    assert raffm_main(["registry", "migrate", "--data-dir", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "registry.db").exists()


def test_bad_database_url_says_what_to_use(capsys):
    assert raffm_main(["registry", "migrate", "--db", "mysql://nowhere/db"]) == 2
    assert "postgresql+psycopg" in capsys.readouterr().err


def test_serve_requires_an_enroll_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAFFM_ENROLL_KEY", raising=False)
    assert raffm_main(["registry", "serve", "--data-dir", str(tmp_path)]) == 2
    assert "--enroll-key" in capsys.readouterr().err


def test_registry_help_lists_both_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        raffm_main(["registry", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "migrate" in out
