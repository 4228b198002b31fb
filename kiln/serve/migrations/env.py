"""Alembic's environment for kiln serve's database: run on the connection the store opened
(`kiln.serve.store.Store.migrate`), never from an alembic.ini."""

from __future__ import annotations

from alembic import context

from kiln.serve.store import VERSION_TABLE, Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,
    version_table=VERSION_TABLE,
)
with context.begin_transaction():
    context.run_migrations()
