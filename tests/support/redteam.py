"""The red team's shared setup (tests/integration/test_escapes.py, test_pool_isolation.py):
a superuser helper, and pgproxy in each pool mode over ONE backend connection, so that the
next person really gets the connection the attacker used."""

from __future__ import annotations

import pytest

from tests.support.attacks import Superuser
from tests.support.proxy import ProxyProcess, merge

MODES = ["session", "transaction"]


def redteam_config(base_config: dict, su: Superuser, mode: str, **backend) -> dict:
    # One backend connection: alice's and bob's sessions land on the same one. Every idle
    # connection is health-checked before reuse, so fresh_pool's terminations are noticed.
    return merge(base_config, {"backend": {**su.backend, "pool_mode": mode, "pool_size": 1, "health_check_after_s": 0,
                                           "acquire_timeout_s": 5, **backend}})


@pytest.fixture(scope="module")
def su(database, tmp_path_factory):
    superuser = Superuser(database, tmp_path_factory.mktemp("redteam"))
    yield superuser
    superuser.close()


@pytest.fixture(scope="module", params=MODES)
def target(request, base_config, su):
    process = ProxyProcess(redteam_config(base_config, su, request.param))
    process.mode = request.param
    yield process
    assert process.stop() == 0, process.log()[-3000:]


@pytest.fixture
def fresh(su):
    """Each attempt starts on a new backend connection, so a leak is the attempt's own."""
    su.fresh_pool()
    return su
