"""Structured output on the real model: every sampled text is an instance of its JSON Schema (checked
with `jsonschema`), a full match of its regex or a sentence of its grammar; what llguidance cannot
enforce is refused before any token; a constrained request gets the tokens it gets alone."""

import json
import re

import pytest
import torch

from llama_lite import SamplingParams
from llama_lite.engine.constraints import Grammars
from tests.conftest import TESTS
from tests.engine.test_engine import collect, corpus_prompts, run_alone

jsonschema = pytest.importorskip("jsonschema")

# 23 schemas: nested objects, arrays with min/max items, enums, number ranges, string patterns and
# formats, optional fields, anyOf, $ref, prefixItems (scripts/bench.py times their masks too).
SCHEMAS = json.loads((TESTS / "schemas.json").read_text())
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8})?", r"0x[0-9a-f]{2,4}",
           r"(\d{1,3}\.){3}\d{1,3}"]
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def prompt(llm):
    return llm.chat_prompt_tokens([{"role": "user", "content": "Answer with one JSON value."}])


def run_all(engine, prompt, params_list):
    rids = [engine.add(prompt, p) for p in params_list]
    done = collect(engine, rids)
    return [done[rid] for rid in rids]


def test_every_sampled_output_validates_against_its_schema(llm, prompt):
    """23 schemas (nested objects, arrays with min/max items, enums, number ranges, string patterns
    and formats, optional fields, anyOf, $ref, prefixItems), three seeds each at temperature 1: every
    text parses and validates, and ends because the grammar said so."""
    params = [SamplingParams(temperature=1.0, top_p=1.0, seed=seed, max_tokens=96, json_schema=schema)
              for schema in SCHEMAS for seed in SEEDS]
    results = run_all(llm.engine, prompt, params)
    for p, (ids, text, reason, _, _) in zip(params, results):
        assert reason == "stop", (p.json_schema, text)
        jsonschema.validate(json.loads(text), p.json_schema, format_checker=jsonschema.FormatChecker())
        assert llm.tokenizer.decode(ids) == text


def test_regex_and_grammar_outputs_match_fully(llm, prompt):
    lark = 'start: "(" num (" + " num)* ")"\nnum: /[1-9][0-9]?/'
    params = [SamplingParams(temperature=1.0, top_p=1.0, seed=seed, max_tokens=40, regex=rx) for rx in REGEXES for seed in SEEDS]
    params += [SamplingParams(temperature=1.0, seed=seed, max_tokens=40, grammar=lark) for seed in SEEDS]
    params += [SamplingParams(temperature=1.0, seed=seed, max_tokens=60, json_object=True) for seed in SEEDS]
    for p, (_, text, reason, _, _) in zip(params, run_all(llm.engine, prompt, params)):
        if p.regex:
            assert reason == "stop" and re.fullmatch(p.regex, text), (p.regex, text)
        elif p.grammar:
            assert reason == "stop" and re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", text), text
        elif reason == "stop":  # json_object: any object, which may be long; a finished one parses
            assert isinstance(json.loads(text), dict), text


def test_max_tokens_mid_value_ends_with_length(llm, prompt):
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 200}}, "required": ["story"]}
    [(ids, text, reason, _, _)] = run_all(llm.engine, prompt, [SamplingParams(temperature=0, max_tokens=6, json_schema=schema)])
    assert reason == "length" and len(ids) == 6 and text.startswith('{')
    with pytest.raises(ValueError):
        json.loads(text)


def test_constrained_request_among_others_gets_what_it_gets_alone(llm, prompt):
    """Constrained (schema, regex; greedy and seeded) and free requests, arriving at different steps,
    8 rows: each one's ids, text and finish reason equal the same request run alone."""
    others = corpus_prompts(llm.tokenizer, [40, 3, 90, 7, 25, 60], seed=5)
    requests = [
        (prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=48, json_schema=SCHEMAS[0])),
        (others[0], SamplingParams(temperature=1.0, seed=1, max_tokens=20)),
        (prompt, SamplingParams(temperature=0, max_tokens=48, json_schema=SCHEMAS[11])),
        (others[1], SamplingParams(temperature=0, max_tokens=12, regex=REGEXES[2])),
        (others[2], SamplingParams(temperature=0.8, seed=3, max_tokens=16, logprobs=True, top_logprobs=2)),
        (prompt, SamplingParams(temperature=1.0, seed=11, max_tokens=40, json_object=True, logprobs=True)),
        (others[3], SamplingParams(temperature=0, max_tokens=10)),
        (others[4], SamplingParams(temperature=1.0, seed=5, max_tokens=30, regex=REGEXES[4])),
        (others[5], SamplingParams(temperature=0.7, seed=9, max_tokens=24, json_schema=SCHEMAS[4], frequency_penalty=0.5)),
    ]
    engine = llm.engine
    first = [engine.add(p, params) for p, params in requests[:4]]
    later = [(2 * k + 1, p, params) for k, (p, params) in enumerate(requests[4:])]
    together = collect(engine, first, later)
    ordered = [together[rid] for rid in sorted(together)]  # ids in the order added
    for (p, params), result in zip(requests, ordered):
        assert result == run_alone(engine, p, params), params


def test_stream_pieces_join_to_the_whole(llm, prompt):
    kw = dict(temperature=1.0, seed=4, json_schema=SCHEMAS[18])
    pieces = list(llm.stream(prompt, 64, **kw))
    [whole] = llm.chat_completion([[{"role": "user", "content": "Answer with one JSON value."}]], max_gen_len=64, **kw)
    assert len(pieces) > 3 and "".join(pieces) == whole["generation"]["content"]
    jsonschema.validate(json.loads(whole["generation"]["content"]), SCHEMAS[18])


@pytest.mark.parametrize("constraint, named", [
    (dict(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
    (dict(json_schema={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), "not"),
    (dict(json_schema={"if": {"type": "string"}, "then": {"minLength": 2}}), '"if", "then"'),
    (dict(json_schema={"type": "object", "dependentRequired": {"a": ["b"]}}), "dependentRequired"),
    (dict(json_schema={"type": "string", "format": "credit-card"}), "Unknown format: credit-card"),
    (dict(json_schema={"oneOf": [{"type": "number"}, {"type": "integer"}]}), "oneOf"),
    (dict(json_schema={"$ref": "https://example.com/schema.json"}), "https://example.com/schema.json"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 3}), "minimum (5) is greater than maximum (3)"),
    (dict(json_schema='{"type": "object",'), "not valid JSON"),
    (dict(json_schema=[1]), "must be a JSON Schema"),
    (dict(regex=r"(?=a)b"), "look-around"),
    (dict(regex=r"(a|b)\1"), "backreferences are not supported"),
    (dict(grammar="start: foo"), 'unknown name: "foo"'),
    (dict(regex="a", json_object=True), "one constraint; got json_object and regex"),
    (dict(regex=""), "non-empty string"),
])
def test_what_cannot_be_enforced_is_refused_before_any_token(llm, constraint, named):
    with pytest.raises(ValueError) as info:
        SamplingParams(**constraint)
    assert named in str(info.value) and "\n" not in str(info.value)
    assert not llm.engine.has_unfinished()


def test_unconstrained_rows_are_left_alone(llm):
    """No matcher, no work: the logits come back as the very same tensor; a constrained row's
    disallowed ids are -inf and its allowed ones untouched."""
    grammars = Grammars(llm.tokenizer, llm.model.params.vocab_size)

    class Row:
        def __init__(self, matcher):
            self.matcher = matcher

    logits = torch.randn(3, llm.model.params.vocab_size)
    free = [Row(None), Row(None), Row(None)]
    assert grammars.mask(free, logits) is logits
    rows = [Row(None), Row(grammars.matcher(SamplingParams(regex="(yes|no)"))), Row(None)]
    masked = grammars.mask(rows, logits)
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all(re.fullmatch(r"(y|ye|yes|n|no)", llm.tokenizer.decode([i])) for i in allowed)
    assert torch.equal(masked[1, allowed], logits[1, allowed])
