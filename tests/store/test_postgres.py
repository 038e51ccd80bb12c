"""The PostgreSQL record store: the store contract, plus its Alembic-managed schema."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from overnight.errors import StoreError
from overnight.store import connect_store
from overnight.store.postgres import PostgresStore, current_revision, head_revision, upgrade
from tests.store.contract import StoreContract, make_batch

pg = pytest.mark.postgres


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    await upgrade(postgres_url)
    s = connect_store(postgres_url)
    assert isinstance(s, PostgresStore)
    await s.open()
    yield s
    await s.aclose()


@pg
class TestPostgresStore(StoreContract):
    pass


# -- schema management -------------------------------------------------------
@pg
async def test_open_on_unmigrated_database_says_to_run_db_upgrade(postgres_url: str) -> None:
    s = PostgresStore(postgres_url)
    with pytest.raises(StoreError) as err:
        await s.open()
    message = str(err.value)
    assert "overnight db upgrade" in message
    assert f"needs {head_revision()}" in message
    assert "none" in message
    assert s._engine is None  # nothing left open after the refusal


@pg
async def test_open_does_not_create_tables(postgres_url: str) -> None:
    with pytest.raises(StoreError):
        await PostgresStore(postgres_url).open()
    assert await current_revision(postgres_url) is None


@pg
async def test_upgrade_then_open_works_and_upgrade_is_idempotent(postgres_url: str) -> None:
    assert await current_revision(postgres_url) is None
    assert await upgrade(postgres_url) == head_revision()
    assert await upgrade(postgres_url) == head_revision()
    assert await current_revision(postgres_url) == head_revision()
    s = PostgresStore(postgres_url)
    await s.open()
    try:
        rec = make_batch()
        await s.insert_batch(rec)
        assert await s.get_batch(rec.id) == rec
    finally:
        await s.aclose()


async def _set_revision(postgres_url: str, revision: str) -> None:
    import asyncpg

    schema = postgres_url.rsplit("schema=", 1)[1]
    conn = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="test")
    try:
        await conn.execute(f'UPDATE "{schema}".alembic_version SET version_num = $1', revision)
    finally:
        await conn.close()


@pg
async def test_open_on_a_newer_unknown_revision_says_the_database_is_ahead(postgres_url: str) -> None:
    await upgrade(postgres_url)
    await _set_revision(postgres_url, "9999")
    with pytest.raises(StoreError, match=r"revision 9999, which this version of overnight does not know") as err:
        await PostgresStore(postgres_url).open()
    assert "newer overnight" in str(err.value)
    with pytest.raises(StoreError, match="migrating PostgreSQL"):
        await upgrade(postgres_url)


@pg
async def test_migrations_create_exactly_the_tables_sql_py_defines(postgres_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.ext.asyncio import create_async_engine

    from overnight.store.sql import metadata

    await upgrade(postgres_url)
    s = PostgresStore(postgres_url)
    engine = create_async_engine(s.url, connect_args={"server_settings": {"search_path": s.schema}})
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), metadata))
    finally:
        await engine.dispose()
    assert diff == []


@pg
async def test_upgrading_a_0001_database_keeps_its_records_and_adds_shards(postgres_url: str) -> None:
    import asyncpg
    import orjson
    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.engine import Connection

    from overnight.store.postgres import _alembic_config, _with_connection
    from overnight.store.records import record_to_doc
    from tests.store.contract import make_shard

    def to_0001(conn: Connection, schema: str) -> None:
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        conn.commit()
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")

    schema = postgres_url.rsplit("schema=", 1)[1]
    await _with_connection(postgres_url, to_0001, schema)
    assert await current_revision(postgres_url) == "0001"

    # A batch written through the 0001 tables (the store refuses to open below head).
    rec = make_batch()
    conn = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="test")
    try:
        await conn.execute(
            f'INSERT INTO "{schema}".overnight_batches (id, tenant, status, input_file_id, version, doc) '
            "VALUES ($1, $2, $3, $4, $5, $6)",
            rec.id, rec.tenant, rec.status, rec.input_file_id, rec.version, orjson.dumps(record_to_doc(rec)).decode(),
        )
    finally:
        await conn.close()
    with pytest.raises(StoreError, match=f"needs {head_revision()}"):
        await PostgresStore(postgres_url).open()

    assert await upgrade(postgres_url) == head_revision()
    s = PostgresStore(postgres_url)
    await s.open()
    try:
        assert await s.get_batch(rec.id) == rec
        shard = make_shard(batch_id=rec.id, index=0, count=2)
        await s.insert_shard(shard)
        await s.update_shard(shard, checkpoint=b"cp")
        assert await s.get_shard_checkpoint(rec.id, 0) == b"cp"
    finally:
        await s.aclose()


@pg
async def test_upgrading_a_0002_database_adds_the_webhook_due_index(postgres_url: str) -> None:
    import dataclasses

    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.engine import Connection

    from overnight.store.postgres import _alembic_config, _with_connection
    from tests.store.contract import NOW, owing

    def to_0002(conn: Connection, schema: str) -> None:
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        conn.commit()
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")

    await _with_connection(postgres_url, to_0002, postgres_url.rsplit("schema=", 1)[1])
    assert await current_revision(postgres_url) == "0002"
    with pytest.raises(StoreError, match=f"needs {head_revision()}"):
        await PostgresStore(postgres_url).open()
    assert await upgrade(postgres_url) == head_revision()
    s = PostgresStore(postgres_url)
    await s.open()
    try:
        rec = make_batch(status="finalizing")
        await s.insert_batch(rec)
        done = await s.update_batch(dataclasses.replace(rec, status="completed", webhook=owing(NOW)))
        assert await s.list_webhooks_due(now=NOW) == [done]
    finally:
        await s.aclose()


@pg
async def test_upgrading_a_0003_database_adds_document_records(postgres_url: str) -> None:
    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.engine import Connection

    from overnight.store.postgres import _alembic_config, _with_connection
    from tests.store.contract import make_doc

    def to_0003(conn: Connection, schema: str) -> None:
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        conn.commit()
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")

    await _with_connection(postgres_url, to_0003, postgres_url.rsplit("schema=", 1)[1])
    assert await current_revision(postgres_url) == "0003"
    with pytest.raises(StoreError, match=f"needs {head_revision()}"):
        await PostgresStore(postgres_url).open()
    assert await upgrade(postgres_url) == head_revision() == "0004"
    s = PostgresStore(postgres_url)
    await s.open()
    try:
        rec = make_doc(key="k")
        await s.insert_doc(rec)
        assert await s.get_doc_by_key("job", "acme", "k") == rec
        assert await s.list_docs("job", tenant="acme", statuses=["queued"]) == [rec]
    finally:
        await s.aclose()


@pg
async def test_doc_lists_and_lookups_are_served_by_indexes(store: PostgresStore) -> None:
    """Every statement list_docs and the lookups send is planned as an index scan
    (with sequential scans priced out, a statement no index fits still shows one)."""
    import asyncpg
    from sqlalchemy import event

    from tests.store.contract import NOW, make_doc

    for i in range(5):
        await store.insert_doc(make_doc(created_at=NOW + i, key=f"k{i}", status=("queued", "done")[i % 2]))
    first = (await store.list_docs("job"))[2]
    sent: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if "overnight_docs" in statement:
            sent.append((statement, tuple(parameters or ())))

    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        for order in ("newest", "oldest"):
            await store.list_docs("job", order=order, after=first.id, limit=2)
            await store.list_docs("job", tenant="acme", order=order, after=first.id)
            await store.list_docs("job", statuses=["queued"], order=order)
            await store.list_docs("job", statuses=["queued", "done"], order=order, after=first.id)
            await store.list_docs("job", tenant="acme", statuses=["queued", "done"], order=order, after=first.id)
        await store.get_doc("job", first.id)
        await store.get_doc_by_key("job", "acme", "k1")
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
    assert len(sent) >= 12
    conn = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="test")
    try:
        await conn.execute(f'SET search_path TO "{store.schema}"')
        await conn.execute("SET enable_seqscan = off")
        for statement, params in sent:
            plan = [r[0] for r in await conn.fetch("EXPLAIN " + statement, *params)]
            conds = [line for line in plan if "Index Cond" in line and "overnight_docs_gone" not in line]
            assert conds and not any("Seq Scan" in line for line in plan), (statement, plan)
            # Each filter is a condition of the index, not a check on rows read.
            for column in ("tenant", "status", "doc_key"):
                if f"overnight_docs.{column} " in statement:
                    assert all(column in line for line in conds if "kind" in line), (column, statement, plan)
    finally:
        await conn.close()


@pg
async def test_concurrent_upgrades_apply_each_revision_once(postgres_url: str) -> None:
    import asyncio

    revisions = await asyncio.gather(*(upgrade(postgres_url) for _ in range(3)))
    assert revisions == [head_revision()] * 3


@pg
def test_cli_db_upgrade_and_current(postgres_url: str) -> None:
    from typer.testing import CliRunner

    from overnight.cli.main import app

    runner = CliRunner()
    before = runner.invoke(app, ["db", "current", "--store", postgres_url])
    assert before.exit_code == 0, before.output
    assert "none" in before.output and "overnight db upgrade" in before.output

    result = runner.invoke(app, ["db", "upgrade", "--store", postgres_url])
    assert result.exit_code == 0, result.output
    assert head_revision() in result.output

    after = runner.invoke(app, ["db", "current"], env={"OVERNIGHT_STORE_URL": postgres_url})
    assert after.exit_code == 0, after.output
    assert f"{head_revision()} (up to date)" in after.output


def test_cli_db_upgrade_on_sqlite_needs_nothing(tmp_path) -> None:
    from typer.testing import CliRunner

    from overnight.cli.main import app

    result = CliRunner().invoke(app, ["db", "upgrade", "--store", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 0, result.output
    assert "created automatically" in result.output


def test_cli_db_upgrade_reports_unreachable_server() -> None:
    from typer.testing import CliRunner

    from overnight.cli.main import app

    result = CliRunner().invoke(app, ["db", "upgrade", "--store", "postgresql://postgres@127.0.0.1:1/test"])
    assert result.exit_code == 1
    assert "error:" in result.output


# -- URLs and connection errors ----------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@db.example:5432/overnight",
        "postgres://u:p@db.example:5432/overnight",
        "postgresql+asyncpg://u:p@db.example:5432/overnight",
    ],
)
def test_every_postgres_url_form_runs_on_asyncpg(url: str) -> None:
    s = connect_store(url)
    assert isinstance(s, PostgresStore)
    assert s.url == "postgresql+asyncpg://u:p@db.example:5432/overnight"
    assert s.schema is None


def test_schema_option_is_taken_out_of_the_driver_url() -> None:
    s = PostgresStore("postgresql://u@h/db?schema=tenant_a&ssl=require")
    assert s.schema == "tenant_a"
    assert s.url == "postgresql+asyncpg://u@h/db?ssl=require"


def test_other_postgres_drivers_are_refused() -> None:
    with pytest.raises(StoreError, match="postgresql://"):
        PostgresStore("postgresql+psycopg://u@h/db")


async def test_unreachable_server_raises_store_error() -> None:
    s = PostgresStore("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(StoreError, match="cannot reach PostgreSQL"):
        await s.open()


@pg
async def test_losing_the_server_after_open_raises_store_error(store: PostgresStore) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.store.contract import make_file

    live, store._engine = store._engine, create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/test")
    try:
        with pytest.raises(StoreError):
            await store.get_file("file-x")
        with pytest.raises(StoreError):
            await store.insert_file(make_file())
        with pytest.raises(StoreError):
            await store.update_batch(make_batch(), checkpoint=b"cp")
    finally:
        await store.engine.dispose()
        store._engine = live
