"""One local Ray cluster for this folder's tests (2 CPUs, no dashboard): starting one costs seconds, so
they share it, and it is shut down after them (an idle cluster's processes slowed later tests' servers
past their start-up timeout); a tiny float32 checkpoint with prompts that carry ids."""

import json

import pytest

from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="package")
def ray_cluster():
    ray = pytest.importorskip("ray", reason='the cluster tests need Ray: pip install -e ".[ray]"')
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return str(write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))


@pytest.fixture(scope="session")
def prompts(tmp_path_factory):
    """96 prompts with ids, of different lengths, as a .jsonl file."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(96):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"the {i} he " * (1 + i % 7)}) + "\n")
    return str(path)
