"""Sampling on the tiny reference model: validation, the llama.cpp sampler chain, grammars and JSON schemas."""
from __future__ import annotations

import collections
import json
import math
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from llama_cpp import llama_grammar

from edgelm.errors import UsageError
from edgelm.runtime.grammar import _COMPLETE, _utf8_step, check_gbnf
from edgelm.runtime.json_schema import schema_to_gbnf
from edgelm.runtime.sampling import SamplerChain, SamplingParams

FLAT = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # plain sampling from the softmax


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.5), ("temperature", "0.7"),
    ("temperature", True),  # bools are not numbers here
    ("top_k", -1), ("top_k", 2.5), ("top_k", 2**31),  # int32 in llama.cpp
    ("top_p", 1.5), ("top_p", math.nan), ("min_p", -0.1), ("typical_p", 1.01), ("typical_p", "1"),
    ("repeat_penalty", 0.0), ("repeat_penalty", -1.0), ("repeat_penalty", math.inf),  # llama.cpp needs > 0
    ("presence_penalty", math.nan), ("frequency_penalty", 1e9), ("frequency_penalty", "1"),
    ("penalty_last_n", -2), ("penalty_last_n", 1.5),
    ("max_tokens", -1), ("max_tokens", 1.0),
    ("seed", -5), ("seed", 2**32 - 1), ("seed", "42"),  # 0xFFFFFFFF means "random" to llama.cpp
    ("logit_bias", [1, 2]), ("logit_bias", {-1: 1.0}), ("logit_bias", {"x": 1.0}), ("logit_bias", {True: 1.0}),
    ("logit_bias", {5: math.nan}), ("logit_bias", {5: math.inf}), ("logit_bias", {5: 1e9}), ("logit_bias", {5: "1"}),
    ("stop", [""]), ("stop", [3]),
    ("ignore_eos", "yes"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", "3"), ("logprobs", 2.0),
    ("grammar", 'root ::= "a'), ("grammar", 'foo ::= "a"'), ("grammar", 3), ("grammar", ""),
    ("grammar", 'root ::= "a"{2,1}'),  # llama.cpp: loops until memory runs out
    ("json_schema", "{"), ("json_schema", 3), ("json_schema", {"type": "integer", "minimum": 1}),
    ("temprature", 0.5),  # unknown field
    ("mirostat", 3), ("mirostat", 1.0), ("mirostat_tau", -1.0), ("mirostat_eta", math.nan),
    ("xtc_probability", 1.5), ("xtc_threshold", -0.1), ("dry_multiplier", -1.0), ("dry_base", 0.5),
    ("dry_allowed_length", 0), ("dry_penalty_last_n", -2), ("dry_sequence_breakers", [""]),
    ("dry_sequence_breakers", ["a\0"]), ("dry_sequence_breakers", ["x" * 41]), ("dry_sequence_breakers", [3]),
    ("dry_sequence_breakers", ["a"] * 33), ("top_n_sigma", -2.0), ("dynatemp_range", -1.0),
    ("dynatemp_exponent", math.inf),
])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_kwargs(**{field: value})


def test_grammar_and_json_schema_exclude_each_other():
    with pytest.raises(UsageError, match="grammar.*json_schema"):
        SamplingParams.from_kwargs(grammar='root ::= "a"', json_schema={"type": "boolean"})


def test_logit_bias_ids_checked_against_the_vocab(tiny_model):
    with pytest.raises(UsageError, match="logit_bias"):
        tiny_model.generate("x", logit_bias={tiny_model.llama.n_vocab: 1.0})


def test_defaults_and_string_token_ids():
    p = SamplingParams.from_kwargs(logit_bias={"12": -math.inf})  # JSON objects carry ids as strings
    assert p.logit_bias == {12: -math.inf}
    off = (p.typical_p, p.repeat_penalty, p.presence_penalty, p.frequency_penalty)
    assert off == (1, 1, 0, 0) and p.penalty_last_n == 64


# ---------------------------------------------------------------- the chain

def test_greedy_is_the_argmax_of_the_logits(tiny_model):
    ctx, prompt = tiny_model.ctx, tiny_model.tokenize("def main():\n")
    sampler = SamplerChain(SamplingParams(temperature=0), tiny_model.llama, ctx.n_ctx)
    ctx.clear()
    ctx.decode(prompt, 0)
    tokens = []
    for pos in range(len(prompt), len(prompt) + 24):
        token = sampler.sample(ctx.ptr)
        assert token == int(np.argmax(ctx.logits()))
        tokens.append(token)
        ctx.decode_one(token, pos)
    sampler.close()
    assert tiny_model.generate("def main():\n", max_tokens=24, temperature=0, ignore_eos=True).tokens == tokens


def test_same_seed_same_text_and_seeds_differ(tiny_model):
    kw = dict(max_tokens=32, temperature=1.1, typical_p=0.9, repeat_penalty=1.2, frequency_penalty=0.3, ignore_eos=True)
    runs = [tiny_model.generate("import ", seed=s, **kw).text for s in (7, 7, 8, 9, 10)]
    assert runs[0] == runs[1]
    assert any(r != runs[0] for r in runs[2:])


def test_logit_bias_bans_and_forces(tiny_model):
    base = tiny_model.generate("def main():\n", max_tokens=40, temperature=0, ignore_eos=True).tokens
    top = collections.Counter(base).most_common(1)[0][0]
    for seed in (1, 2):
        out = tiny_model.generate("def main():\n", max_tokens=40, seed=seed, ignore_eos=True,
                                  logit_bias={top: -math.inf})
        assert top not in out.tokens
    forced = tiny_model.tokenize("Z", add_special=False)[0]
    for temperature in (0, 0.8):
        out = tiny_model.generate("def main():\n", max_tokens=8, temperature=temperature, seed=3,
                                  logit_bias={forced: 100.0})
        assert out.tokens == [forced] * 8


@pytest.mark.parametrize("penalty, window", [
    ({"repeat_penalty": 1.5}, "penalty_last_n"), ({"frequency_penalty": 1.0}, "penalty_last_n"),
    ({"presence_penalty": 1.5}, "penalty_last_n"),
    # DRY without breakers: the loop runs across lines
    ({"dry_multiplier": 0.8, "dry_sequence_breakers": ()}, "dry_penalty_last_n"),
])
def test_penalties_break_a_greedy_loop(tiny_model, penalty, window):
    prompt = "import os\nimport os\nimport"  # greedy: " sys\nimport _get\n" over and over
    loop = tiny_model.generate(prompt, max_tokens=64, temperature=0, ignore_eos=True).tokens
    varied = tiny_model.generate(prompt, max_tokens=64, temperature=0, ignore_eos=True, **penalty).tokens
    assert len(set(varied)) > 2 * len(set(loop))
    off = tiny_model.generate(prompt, max_tokens=64, temperature=0, ignore_eos=True, **{window: 0}, **penalty)
    assert off.tokens == loop  # a window of 0 turns them off


def test_prompt_tokens_are_in_the_penalty_window(tiny_model):
    # as llama.cpp's server and CLI: the first token is penalised for repeating the prompt
    prompt = "x = 1\nx = 1\nx = 1\nx"
    plain = tiny_model.generate(prompt, max_tokens=1, temperature=0).tokens[0]
    assert plain in tiny_model.tokenize(prompt)
    assert tiny_model.generate(prompt, max_tokens=1, temperature=0, repeat_penalty=2.0).tokens[0] != plain


def test_typical_p_changes_the_distribution(tiny_model):
    ctx = tiny_model.ctx
    ctx.clear()
    ctx.decode(tiny_model.tokenize("    "), 0)
    logits = ctx.logits().astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    # locally typical set (Meister et al.): closest to the entropy in surprisal, up to 0.5 of the mass
    order = np.argsort(np.abs(-np.log(p) - (-(p * np.log(p)).sum())))
    typical_set = set(order[:np.searchsorted(np.cumsum(p[order]), 0.5, side="right") + 1].tolist())

    def first_tokens(**kw):
        return {tiny_model.generate("    ", max_tokens=1, seed=s, **FLAT, **kw).tokens[0] for s in range(60)}
    assert first_tokens(typical_p=0.5) <= typical_set
    assert not first_tokens() <= typical_set


def test_max_tokens_zero(tiny_model):
    c = tiny_model.generate("x", max_tokens=0)
    assert (c.text, c.tokens, c.finish_reason) == ("", [], "length")


# ---------------------------------------------------------------- grammars

@pytest.mark.parametrize("temperature", [0, 0.8, 1.5])
def test_grammar_yes_or_no(tiny_model, temperature):
    for seed in range(3):
        c = tiny_model.generate("Answer: ", grammar='root ::= ("yes" | "no")', temperature=temperature, seed=seed,
                                max_tokens=16)
        assert c.text in ("yes", "no") and c.finish_reason == "stop"


def test_grammar_digits(tiny_model):
    for seed in range(4):
        c = tiny_model.generate("x = ", grammar="root ::= [0-9]{1,8}", seed=seed, max_tokens=16, **FLAT)
        assert re.fullmatch(r"[0-9]{1,8}", c.text), c.text
        assert c.finish_reason == "stop"


def test_grammar_ends_generation_even_with_ignore_eos(tiny_model):
    c = tiny_model.generate("def ", grammar='root ::= "ab" "cd"', ignore_eos=True, max_tokens=20)
    assert (c.text, c.finish_reason) == ("abcd", "stop")


@pytest.mark.parametrize("grammar", ["root ::= []", "root ::= [z-a]"])  # no character can ever match
def test_grammar_dead_end_stops_cleanly(tiny_model, grammar):
    c = tiny_model.generate("x", grammar=grammar, max_tokens=8)
    assert (c.text, c.finish_reason) == ("", "stop")


def test_everything_banned_stops_cleanly(tiny_model):
    c = tiny_model.generate("x", logit_bias={t: -math.inf for t in range(tiny_model.llama.n_vocab)})
    assert (c.text, c.finish_reason) == ("", "stop")


@pytest.mark.parametrize("text,stop,expected", [
    ("hello world foo", "lo wo", "hel"),  # the stop spans several tokens
    ("aé日本b", "本", "aé日"),  # multi-byte characters, possibly split over byte tokens
])
def test_stop_strings_under_a_grammar(tiny_model, text, stop, expected):
    grammar = f"root ::= {json.dumps(text, ensure_ascii=False)}"
    full = tiny_model.generate("x", grammar=grammar, max_tokens=40)
    assert full.text == text
    cut = tiny_model.generate("x", grammar=grammar, max_tokens=40, stop=[stop])
    assert (cut.text, cut.finish_reason) == (expected, "stop")


BROKEN_GRAMMARS = [
    ('root ::= "a"{2,1}', "maximum is below"),  # llama.cpp: allocates until the process dies
    ('root ::= x root "b" | "c"\nx ::= "a"?', "left recursion"),  # llama.cpp: same, through a nullable rule
    ("root ::= [a] !<[7]>", "token references"),  # llama.cpp: throws through the C API on "at"
    ("root ::= " + "(" * 200 + '"a"' + ")" * 200, "nested"),  # llama.cpp: C stack overflow near 20,000
    ('root ::= a\na ::= a "x"', "left recursion"),
    ("root ::= foo", "undefined rule 'foo'"),
    ('root ::= "a" | *', "must follow"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= ("a" | "b"', "unclosed"),
    ('root ::= "a"\x00"b"', "NUL"),
]


def test_broken_grammars_fail_cleanly_and_the_process_survives(tiny_gguf):
    # a subprocess, so that a regression that aborts the process fails this test instead of the session
    script = textwrap.dedent(f"""
        import json, sys, edgelm
        from edgelm.errors import UsageError
        m = edgelm.load({str(tiny_gguf["f32"])!r}, n_ctx=128, n_threads=2)
        for grammar in json.loads(sys.argv[1]):
            try:
                m.generate("x", grammar=grammar, max_tokens=4)
                print("accepted")
            except UsageError as err:
                print(str(err).replace("\\n", " "))
        print("alive")
    """)
    r = subprocess.run([sys.executable, "-c", script, json.dumps([g for g, _ in BROKEN_GRAMMARS])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[-1] == "alive"
    for (grammar, expected), line in zip(BROKEN_GRAMMARS, lines):
        assert "grammar" in line and expected in line, (grammar, line)


def test_llama_cpp_example_grammars_pass_the_checker():
    texts = [getattr(llama_grammar, n) for n in ("ARITHMETIC_GBNF", "C_GBNF", "CHESS_GBNF", "JSON_GBNF", "LIST_GBNF")]
    vendored = Path(__file__).resolve().parents[1] / ".cache"  # llama.cpp's grammars/, where the sources are
    texts += [f.read_text("utf-8") for f in vendored.glob("llama_cpp_python-*/vendor/llama.cpp/grammars/*.gbnf")]
    for text in texts:
        check_gbnf(text)


@pytest.mark.parametrize("data,valid", [
    (b"a\xc3\xa9", True), (b"\xe6\x97\xa5", True), (b"\xf0\x9f\x98\x80", True),
    (b"\xc0\xa2", False),  # overlong '"'
    (b"\xed\xa0\x80", False),  # a surrogate
    (b"\xf4\x90\x80\x80", False),  # past U+10FFFF
    (b"\xf5\x80", False), (b"\x80", False),
])
def test_utf8_guard_steps(data, valid):
    assert (_utf8_step(_COMPLETE, data) is not None) == valid


# ---------------------------------------------------------------- JSON schema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "kind": {"enum": ["cat", "dog", 'say "hi"\n']},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "score": {"type": ["number", "null"]},
    },
    "required": ["name", "age", "kind", "tags"],
}
POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "ok": {"type": "boolean"}}, "required": ["x", "ok"]}
POINTS = {"type": "array", "items": POINT, "minItems": 1, "maxItems": 3}


def _valid(value, schema) -> bool:
    """A hand check of the keywords used above, for when `jsonschema` is not installed."""
    if "enum" in schema:
        return value in schema["enum"]
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    ok = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None),
          "array": list, "object": dict}
    if isinstance(value, bool) and "boolean" not in kinds or not any(isinstance(value, ok[k]) for k in kinds):
        return False
    if isinstance(value, str):
        return len(value) <= schema.get("maxLength", len(value))
    if isinstance(value, list):
        return (schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
                and all(_valid(v, schema["items"]) for v in value))
    if isinstance(value, dict):
        props = schema["properties"]
        return (set(schema["required"]) <= set(value) <= set(props)
                and all(_valid(v, props[k]) for k, v in value.items()))
    return True


@pytest.mark.parametrize("schema", [PERSON, POINTS, {"type": "boolean"}])
def test_json_schema_output_parses_and_validates(tiny_model, schema):
    for seed in range(3):
        c = tiny_model.generate("data = ", json_schema=schema, seed=seed, max_tokens=300)
        assert c.finish_reason == "stop", c.text
        value = json.loads(c.text)  # strict: no raw control characters in strings
        try:
            import jsonschema
        except ImportError:
            assert _valid(value, schema), c.text
        else:
            jsonschema.validate(value, schema)


def test_json_schema_as_text():
    assert SamplingParams.from_kwargs(json_schema=json.dumps(PERSON)).gbnf == SamplingParams(json_schema=PERSON).gbnf


def test_json_schema_escapes_constants(tiny_model):
    value = 'say "hi"\n\\ é'
    c = tiny_model.generate("x", json_schema={"const": value}, max_tokens=40)
    assert json.loads(c.text) == value


@pytest.mark.parametrize("schema,expected", [
    ({"type": "object", "required": ["a"]}, "required property 'a'"),
    ({"type": "string", "pattern": "^.*$"}, "pattern"),  # '.' could put a raw quote into the string
    ({"type": "string", "minLength": 3, "maxLength": 2}, "cannot be satisfied"),
    ({"anyOf": [{"type": "string"}], "properties": {}}, "anyOf/oneOf"),  # the converter would drop one of them
    ({"type": "array", "items": {"type": "number", "multipleOf": 2}}, "multipleOf"),
])
def test_unsupported_json_schemas_are_refused(schema, expected):
    with pytest.raises(UsageError, match=re.escape(expected)):
        schema_to_gbnf(schema)


def test_greedy_with_a_bias_picks_what_llama_cpps_chain_picks(tiny_model):
    import llama_cpp as lib

    from edgelm.runtime.sampling import SamplerChain

    ctx = tiny_model.ctx
    rng = np.random.default_rng(0)
    for prompt in ("def main():\n", "import os\n", "class A:\n    "):
        ctx.clear()
        ctx.decode(tiny_model.tokenize(prompt), 0)
        top = np.argsort(ctx.logits())[::-1][:6]
        bias = {int(t): float(b) for t, b in zip(top, rng.uniform(-3, 3, size=6))} | {int(top[1]): -math.inf}
        ours = SamplerChain(SamplingParams.from_kwargs(temperature=0, logit_bias=bias), tiny_model.llama, 512)
        items = [lib.llama_logit_bias(t, b) for t, b in bias.items()]
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(
            tiny_model.llama.n_vocab, len(items), (lib.llama_logit_bias * len(items))(*items)))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        try:
            assert ours.sample(ctx.ptr) == lib.llama_sampler_sample(chain, ctx.ptr, -1)
        finally:
            lib.llama_sampler_free(chain)
            ours.close()


def test_biased_argmax_without_a_copy_equals_the_copy():
    """The greedy fast path with a logit bias (runtime.sampling.biased_argmax) against the plain definition, on
    rows with ties, bans, boosts and everything banned."""
    from edgelm.runtime.sampling import biased_argmax

    def reference(row, ids, bias):
        biased = row.copy()
        biased[ids] += bias
        return int(biased.argmax()) if biased.max() > -np.inf else None

    rng = np.random.default_rng(0)
    for _ in range(3000):
        row = rng.integers(-3, 4, size=12).astype(np.float32)  # small integers: many ties
        ids = rng.choice(12, size=int(rng.integers(1, 6)), replace=False)
        bias = rng.choice([-np.inf, -2.0, -1.0, 0.0, 1.0, 3.0], size=len(ids)).astype(np.float32)
        assert biased_argmax(row, ids, bias) == reference(row, ids, bias), (row, ids, bias)
    row = np.zeros(4, np.float32)
    assert biased_argmax(row, np.arange(4), np.full(4, -np.inf, np.float32)) is None


# ---------------------------------------------------------------- llama.cpp's other samplers

def surprise_bits(out) -> float:
    """The mean surprise, -log2 p, of the chosen tokens under the model's own distribution."""
    return float(np.mean([-lp.logprob / math.log(2) for lp in out.logprobs]))


def test_mirostat_holds_surprise_near_its_target(tiny_model):
    """Mirostat 1.0 and 2.0: a lower target surprise (tau) gives text the model finds less surprising; the same
    seed gives the same text."""
    prompt = "def main():\n"

    def mean_surprise(**kw) -> float:
        kw = {"temperature": 1.0, **kw}
        return statistics.mean(surprise_bits(tiny_model.generate(prompt, max_tokens=96, ignore_eos=True, seed=s,
                                                                 logprobs=0, **kw)) for s in range(4))
    plain = mean_surprise(**FLAT)
    for version in (1, 2):
        low, high = mean_surprise(mirostat=version, mirostat_tau=1.0), mean_surprise(mirostat=version, mirostat_tau=8.0)
        assert low < high and low < plain / 2, (version, low, high, plain)
        a, b = (tiny_model.generate(prompt, max_tokens=32, seed=9, mirostat=version, mirostat_tau=3.0)
                for _ in range(2))
        assert a.tokens == b.tokens


def test_xtc_drops_the_most_likely_tokens(tiny_model):
    """XTC at probability 1: wherever two or more tokens reach the threshold, the chosen one is not the top."""
    threshold = 0.1
    hits = 0
    for seed in range(3):
        out = tiny_model.generate("import os\n", max_tokens=48, ignore_eos=True, seed=seed, logprobs=2, **FLAT,
                                  xtc_probability=1.0, xtc_threshold=threshold)
        for token, lp in zip(out.tokens, out.logprobs):
            (top, p1), (_, p2) = lp.top[:2]
            if math.exp(p2) >= threshold:  # two above the threshold: every one of them but the least likely goes
                hits += 1
                assert token != top
    assert hits >= 5
    greedy = tiny_model.generate("import os\n", max_tokens=16, temperature=0)
    assert tiny_model.generate("import os\n", max_tokens=16, temperature=0, xtc_probability=1.0).tokens == greedy.tokens


def test_top_n_sigma_and_dynamic_temperature(tiny_model):
    prompt = "class Stack:\n"
    greedy = tiny_model.generate(prompt, max_tokens=32, temperature=0, ignore_eos=True).tokens
    hot = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=5, max_tokens=32, ignore_eos=True)
    assert tiny_model.generate(prompt, **hot).tokens != greedy
    assert tiny_model.generate(prompt, top_n_sigma=0.001, **hot).tokens == greedy  # only the top logit is that close
    plain = tiny_model.generate(prompt, **hot).tokens
    dynamic = [tiny_model.generate(prompt, dynatemp_range=1.5, **hot).tokens for _ in range(2)]
    assert dynamic[0] == dynamic[1] != plain


def test_samplers_that_remember_decode_without_drafts():
    from edgelm.runtime.speculative import speculative_mode

    def mode(**kw):
        return speculative_mode(SamplingParams.from_kwargs(**kw))
    assert mode(temperature=0.8) == mode(temperature=0.8, top_n_sigma=1.0) == mode(dynatemp_range=0.5) == "sample"
    for kw in ({"mirostat": 2}, {"xtc_probability": 0.5}, {"dry_multiplier": 0.8},
               {"temperature": 0, "dry_multiplier": 0.8}):
        assert mode(**kw) == "plain", kw
    assert mode(temperature=0, mirostat=2, xtc_probability=0.5) == "greedy"  # neither acts on greedy decoding
