"""Alembic environment: genq passes the database URL in the Config (see genq.db.alembic_config)."""

from alembic import context
from sqlalchemy import pool

from genq.db import make_engine
from genq.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    if not url.startswith("sqlite"):
        engine.pool = pool.NullPool(engine.pool._creator)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=url.startswith("sqlite"),  # SQLite ALTER TABLE needs batch mode
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
