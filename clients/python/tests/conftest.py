import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import Ingest, TestQueue, unique  # noqa: E402


@pytest.fixture
def exchange():
    return unique("ingest-client-test")


@pytest.fixture
def queue(exchange):
    q = TestQueue(exchange)
    yield q
    q.close()


@pytest.fixture
def ingest(queue):
    """ingest on the shared broker, publishing to the test's exchange."""
    server = Ingest(queue.exchange).ready()
    yield server
    server.stop()
