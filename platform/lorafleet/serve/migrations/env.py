"""Alembic's environment for the registry: migrations run on the connection ``upgrade`` hands over."""

from alembic import context

from lorafleet.serve.migrations import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
