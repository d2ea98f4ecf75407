import os

import pytest
from crash_helpers import Cli


@pytest.fixture
def cli(tmp_path) -> Cli:
    return Cli({**os.environ, "VLMEDGE_CACHE": str(tmp_path / "cache"), "COLUMNS": "400"})
