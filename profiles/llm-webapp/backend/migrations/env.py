"""Alembic environment: the database URL comes from DATABASE_URL (bundler passes it in the
environment, never on the command line)."""

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name)  # "Running upgrade ..." lines, as usual

url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
with create_engine(url).connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
