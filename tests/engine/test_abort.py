"""`engine.abort` of an id this engine never gave is a ValueError (a typo would otherwise abort nothing,
silently); an id of a request that already finished stays a no-op (servers abort finished requests
routinely: a client that leaves after the last token)."""

import pytest

from llama_lite import SamplingParams
from llama_lite.engine.engine import Engine
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from llama_lite import Llama

    path = write_tiny_gguf(tmp_path_factory.mktemp("abort") / "tiny.gguf")
    return Llama.build(path, device="cpu", dtype="float32", max_seq_len=64, max_batch_size=2, seed=0)


def _drain(engine):
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


@pytest.mark.parametrize("bad", [5, -1, "0", 0.0, None, True, [0]])
def test_abort_of_an_id_never_given_is_a_value_error(tiny_llm, bad):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, tiny_llm.generator)
    engine.add([1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(ValueError, match=r"was never given by this engine; pass an id engine.add returned"):
        engine.abort(bad)
    assert [o.finish_reason for o in _drain(engine) if o.finished] == ["length"]  # the real request is untouched


def test_abort_of_a_finished_request_is_a_no_op(tiny_llm):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, tiny_llm.generator)
    done = engine.add([1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
    _drain(engine)
    running = engine.add([4, 5, 6], SamplingParams(max_tokens=2, temperature=0))
    engine.abort(done)  # finished: nothing happens, twice
    engine.abort(done)
    finished = {o.request_id: o.finish_reason for o in _drain(engine) if o.finished}
    assert finished == {running: "length"}
    engine.abort(running)
    assert not engine.has_unfinished()


def test_abort_ends_a_running_request(tiny_llm):
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, tiny_llm.generator)
    rid = engine.add([1, 2, 3], SamplingParams(max_tokens=20, temperature=0))
    engine.step()
    engine.abort(rid)
    assert [(o.request_id, o.finish_reason) for o in _drain(engine) if o.finished] == [(rid, "abort")]
