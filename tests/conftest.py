"""Shared fixtures: the real SmolLM2 GGUF (loaded once per session) and its transformers oracle; and
the helpers the test folders share (import them as `from tests.conftest import ...`): the repository's
paths and a float32 CPU build."""

import signal
from pathlib import Path

import pytest
import torch

from llama_lite import Llama
from llama_lite.loading.download import default_checkpoint
from llama_lite.model.devices import usable_cores
from tests.tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent  # the repository: scripts/, tokenizer/, tests/
TESTS = ROOT / "tests"  # schemas.json, templates/

# A suite started in the background of a non-interactive shell (`bash .ci/run &`) inherits SIGINT
# ignored, and so would the commands it interrupts as a user's Ctrl-C does (they would run on, as a
# background job should): Python's own handler back, which each child then takes as a fresh start.
signal.signal(signal.SIGINT, signal.default_int_handler)


def build_cpu(path, **settings):
    """Llama.build on the CPU in float32 (what the CPU tests compare bit for bit); `settings` add to or
    override those two."""
    return Llama.build(path, **{"device": "cpu", "dtype": "float32", **settings})


@pytest.fixture(scope="session")
def smollm_path():
    return default_checkpoint()


@pytest.fixture(scope="session")
def llm(smollm_path):
    return build_cpu(smollm_path, max_seq_len=512, max_batch_size=8, seed=0)


@pytest.fixture(scope="session")
def hf_model(smollm_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm_path.parent, gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


# SmolLM2 on the int4 path (the default where it measures fastest), as the `int4_compiled` fixture builds it;
# threads fixed: the artifact is keyed by them, and the default (idle cores) changes with what else runs
INT4 = {"max_seq_len": 256, "max_batch_size": 4, "device": "cpu", "seed": 0, "quantize": "int4", "threads": usable_cores()}


@pytest.fixture(scope="session")
def int4_compiled(smollm_path, int4_step_building):
    """SmolLM2 on the int4 path with its compiled step (built by the time it is asked for, or now)."""
    if int4_step_building is not None:
        int4_step_building.wait()
    return Llama.build(smollm_path, compile=True, **INT4)


@pytest.fixture(scope="session", autouse=True)
def int4_step_building(request):
    """The build of `int4_compiled`'s step (a few minutes), started in the background as the session
    starts, at the lowest priority as a user's first start does: its minutes pass while the tests
    before the ones that need it run. None where none of the session's tests needs it, or it is built."""
    if not any("int4_compiled" in item.fixturenames for item in request.session.items):
        yield None
        return
    child = Llama.build(default_checkpoint(), **INT4).compiling  # compile=None: built by another process
    yield child
    if child is not None and child.poll() is None:
        child.kill()


@pytest.fixture(scope="session", autouse=True)
def no_background_compiles(int4_step_building):
    """Builds in this process start no compile child (tests that want one run in a subprocess): a
    child per test model would compile beside the suite for minutes. Session-wide, so that models
    built by module- and session-scoped fixtures (set up before any test's own fixtures) start none
    either. (After int4_step_building, the one child the suite wants.)"""
    from llama_lite import precompile

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precompile, "start_in_background", lambda cmd, folder: None)
        yield
