"""The storage contract: what every implementation of the domain's storage ports must do.

Each module here is one port of server/union/domain/ports.py (catalogue, identities and
verifications, lookups and their bank tasks, reports, card actions, audit trail, outbox,
quotas, statistics, retention), tested only through the port's methods, never through SQL.
The `store` fixture (conftest.py) opens one store per backend in the `database_url`
fixture (tests/conftest.py: SQLite and PostgreSQL), so every test runs on each backend; a
third backend joins that fixture's parameters and must pass this suite unchanged.
"""
