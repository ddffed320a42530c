import os

import pytest

# Two cores are shared by every process a test starts (Ray workers, Serve replicas): keep torch polite.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting threads starve other processes


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory):
    """A small generated world shared by the tests that only read it."""
    from actors.shapes.generate import GenerateConfig, generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, GenerateConfig(size=90, seed=7), progress=False)
    return out


@pytest.fixture(scope="session")
def shapes_tokenizer():
    from actors.shapes.tokenizer import build_tokenizer

    return build_tokenizer()
