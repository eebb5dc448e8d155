"""The runtime core on the tiny reference model: generation, determinism, stops, validation."""
from __future__ import annotations

import math

import pytest

from edgelm.errors import ContextOverflowError, UsageError
from edgelm.runtime.generate import StopMatcher


def test_greedy_is_deterministic(tiny_model):
    a = tiny_model.generate("def main():\n", max_tokens=24, temperature=0)
    b = tiny_model.generate("def main():\n", max_tokens=24, temperature=0)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.finish_reason in ("length", "stop")
    assert a.timings.prompt_tokens == len(tiny_model.tokenize("def main():\n"))


def test_seeded_sampling_repeats_and_seeds_differ(tiny_model):
    runs = [tiny_model.generate("import ", max_tokens=24, temperature=1.0, seed=s).tokens for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stream_concatenates_to_generate(tiny_model):
    full = tiny_model.generate("class ", max_tokens=20, temperature=0)
    chunks = list(tiny_model.stream("class ", max_tokens=20, temperature=0))
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].finish_reason == full.finish_reason and chunks[-1].timings is not None


def test_stop_string_is_not_emitted(tiny_model):
    full = tiny_model.generate("def ", max_tokens=40, temperature=0, ignore_eos=True)
    assert len(full.text) > 6
    stop = full.text[3:6]  # a stop that begins inside the generated text
    cut = tiny_model.generate("def ", max_tokens=40, temperature=0, stop=[stop], ignore_eos=True)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


@pytest.mark.parametrize("chunks,stops,expected", [
    (["ab", "c"], ("bc",), ("a", True)),  # stop split across chunks
    (["hello ", "wor", "ld"], ("world",), ("hello ", True)),
    (["abc"], ("x",), ("abc", False)),
    (["a", "b"], ("bx",), ("a", False)),  # "b" held back: could start "bx"
])
def test_stop_matcher(chunks, stops, expected):
    m = StopMatcher(stops)
    out, stopped = "", False
    for c in chunks:
        text, stopped = m.feed(c)
        out += text
        if stopped:
            break
    assert (out, stopped) == expected


def test_max_tokens_and_context_end(tiny_gguf):
    import edgelm

    with edgelm.load(tiny_gguf["q8_0"], n_ctx=32, n_threads=2) as m:
        n_ctx = m.n_ctx  # llama.cpp may round the size up
        c = m.generate("x", max_tokens=n_ctx + 50, temperature=0, ignore_eos=True)
        assert c.finish_reason == "length"
        assert c.timings.prompt_tokens + len(c.tokens) == n_ctx + 1  # the last token is sampled, never decoded
        with pytest.raises(ContextOverflowError):
            m.generate("word " * (n_ctx + 1), max_tokens=4)


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", -1.0), ("top_k", -1), ("top_p", 1.5),
    ("max_tokens", -3), ("min_p", "0.1"), ("seed", -5),
])
def test_invalid_sampling_names_the_field(tiny_model, field, value):
    with pytest.raises(UsageError, match=field):
        tiny_model.generate("x", **{field: value})


def test_unknown_sampling_field(tiny_model):
    with pytest.raises(UsageError, match="frobnicate"):
        tiny_model.generate("x", frobnicate=1)


def test_token_ids_are_checked_before_llama_cpp(tiny_model):
    with pytest.raises(UsageError, match="out of range"):
        tiny_model.generate([0, 10**6], max_tokens=1)
    with pytest.raises(UsageError, match="out of range"):
        tiny_model.detokenize([-1])


def test_stories260k_continues_as_documented(stories):
    import edgelm

    with edgelm.load(stories, n_ctx=256, n_threads=2) as m:
        c = m.generate("Once upon a time", max_tokens=16, temperature=0)
    assert c.text.startswith(", there was a little girl named Lily")


def test_context_shift_generates_past_the_context_end(tiny_gguf):
    """context_shift (llama.cpp's --context-shift): at the context's end the older half of what follows the kept
    prompt leaves and generation goes on; what comes next is what a fresh context holding the kept tokens gives."""
    import edgelm

    options = dict(n_ctx=256, n_threads=2, type_k="f32", type_v="f32", prefix_cache_bytes=0)
    with edgelm.load(tiny_gguf["f32"], **options) as plain:
        prompt = plain.tokenize("def parse(line):\n")
        n_ctx, p = plain.n_ctx, len(prompt)
        ref = plain.generate(prompt, max_tokens=2 * n_ctx, temperature=0, ignore_eos=True)
        assert len(ref.tokens) == n_ctx - p + 1 and ref.finish_reason == "length"
        with edgelm.load(tiny_gguf["f32"], context_shift=True, keep=-1, **options) as m:
            out = m.generate(prompt, max_tokens=2 * n_ctx, temperature=0, ignore_eos=True)
            assert len(out.tokens) == 2 * n_ctx and out.finish_reason == "length"
            assert out.tokens[:len(ref.tokens)] == ref.tokens  # the same up to the first shift
            # the first shift kept the prompt and dropped the older half of the generated tokens
            discard, i = (n_ctx - p) // 2, n_ctx - p
            kept = prompt + out.tokens[discard:i + 1]
            fresh = plain.generate(kept, max_tokens=16, temperature=0, ignore_eos=True)
            assert out.tokens[i + 1:i + 17] == fresh.tokens
            streamed = "".join(c.text for c in m.stream(prompt, max_tokens=2 * n_ctx, temperature=0, ignore_eos=True))
            assert streamed == out.text
    with pytest.raises(UsageError, match="keep"):
        edgelm.load(tiny_gguf["f32"], context_shift=True, keep=-2)
    with pytest.raises(UsageError, match="exclude each other"):
        edgelm.load(tiny_gguf["f32"], context_shift=True, lookup=True)
