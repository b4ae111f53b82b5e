"""Shared fixtures: a tiny saved LLaMA-style model with its own tokenizer (offsite.demo.tiny), and client data files."""
from __future__ import annotations

from pathlib import Path

import pytest

from offsite.demo import domain
from offsite.demo.tiny import make_tiny_model


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the session (offsite.demo.postgres); each test takes a new database."""
    from offsite.demo import postgres
    why = postgres.unavailable()
    if why:
        pytest.skip(why)
    server = postgres.Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def client_data(tmp_path_factory) -> list[Path]:
    return domain.write_clients(tmp_path_factory.mktemp("data"), n_clients=2, n_train=40, n_heldout=10)
