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


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (starting one costs ~5 s on 2 cores).

    More logical CPUs than cores: two Train workers at 1 CPU each would otherwise leave nothing for a
    Serve replica or a Ray Data actor, and the pipeline would stall without an error.
    Yields the cluster's address, so a test can start a second driver against it.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}})
    yield ray.get_runtime_context().gcs_address
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
