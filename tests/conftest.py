import os
from pathlib import Path

import pytest

OUTPUT_DIR = Path(os.environ.get("GPULAB_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output"))


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Where tests keep artefacts worth looking at (screenshots)."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR
