"""The public Model API beyond generation: embeddings, perplexity, load-time defaults, prompt limits."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import edgelm
from edgelm.errors import ContextOverflowError, UsageError

CODE = ["def add(a, b):\n    return a + b\n", "def plus(x, y):\n    return x + y\n"]
PROSE = "The weather was pleasant and the children played in the park until sunset."


@pytest.fixture(scope="module")
def small():
    with edgelm.load(n_ctx=256, n_threads=2) as m:  # the bundled model
        yield m


def test_embed_shape_norm_and_similarity(small):
    e = small.embed(CODE + [PROSE])
    assert e.shape == (3, small.llama.n_embd) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]  # two functions are closer than code and prose


def test_embed_is_the_mean_of_hidden_states(small):
    """Pooling over one sequence: a text embedded alone equals its row in a batch, and does not depend on order."""
    alone = small.embed(CODE[1])
    batch = small.embed([PROSE, CODE[1]])
    assert np.allclose(alone, batch[1], atol=1e-5)
    raw = small.embed(CODE[1], normalize=False)
    assert np.linalg.norm(raw) > 0 and np.allclose(raw / np.linalg.norm(raw), alone, atol=1e-5)


def test_embed_bad_input(small):
    with pytest.raises(UsageError):
        small.embed([CODE[0], 3])
    with pytest.raises(ContextOverflowError, match="tokens"):
        small.embed("x = 1\n" * 400)


def test_perplexity_ranks_in_domain_text_lower(small):
    from edgelm import corpus

    code = corpus.text("heldout", max_chars=4000)
    noise = " ".join(f"{w}" for w in np.random.default_rng(0).choice(["zq", "xv", "kj", "wp"], 600))
    assert small.perplexity(code).perplexity < small.perplexity(noise).perplexity


def test_load_seed_is_the_default_seed(tiny_gguf):
    texts = []
    for _ in range(2):
        with edgelm.load(tiny_gguf["q8_0"], n_ctx=128, n_threads=2, seed=7) as m:
            texts.append(m.generate("import", max_tokens=16, temperature=1.0).text)
            texts.append(m.generate("import", max_tokens=16, temperature=1.0, seed=8).text)
    assert texts[0] == texts[2] and texts[1] == texts[3]


def test_prompt_longer_than_context(tiny_gguf):
    long = "x = 1\n" * 200
    with edgelm.load(tiny_gguf["q8_0"], n_ctx=128, n_threads=2) as m:
        with pytest.raises(ContextOverflowError, match="truncate"):
            m.generate(long, max_tokens=4)
        c = m.generate(long, max_tokens=8, temperature=0, truncate="left", ignore_eos=True)
        assert c.finish_reason == "length" and c.timings.prompt_tokens + 8 <= m.n_ctx
        with pytest.raises(UsageError, match="truncate"):
            m.generate("x", truncate="middle")
    with edgelm.load(tiny_gguf["q8_0"], n_ctx=128, n_threads=2, truncate="left") as m:
        assert m.generate(long, max_tokens=4, ignore_eos=True).finish_reason == "length"


@pytest.mark.parametrize("prompt", [[], None, 42, [0, -1], [10**9]])
def test_bad_prompts(tiny_model, prompt):
    with pytest.raises(UsageError):
        tiny_model.generate(prompt, max_tokens=2)


def test_empty_text_prompt_starts_from_bos(tiny_model):
    assert tiny_model.llama.add_bos
    c = tiny_model.generate("", max_tokens=4, temperature=0, ignore_eos=True)
    assert c.timings.prompt_tokens == 1 and len(c.tokens) == 4


def test_bad_load_options(tiny_gguf):
    for kwargs in ({"n_ctx": -1}, {"n_threads": 0}, {"type_k": "q2_k"}, {"seed": -3}, {"truncate": "right"}):
        with pytest.raises(UsageError):
            edgelm.load(tiny_gguf["q8_0"], **kwargs)


def test_one_model_serves_many_threads(tiny_model):
    """Concurrent callers are serialised, and each gets what it would get alone."""
    prompts = ["import os", "class A:", "def f(x):", "for i in range(3):"]
    alone = {p: tiny_model.generate(p, max_tokens=12, temperature=0).text for p in prompts}
    got, errors = {}, []

    def worker(p):
        try:
            got[p] = tiny_model.generate(p, max_tokens=12, temperature=0).text
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == alone



@pytest.mark.parametrize("options", [{}, {"early_exit": 4}, {"draft": "tiny"}], ids=["plain", "early exit", "draft"])
def test_warm_up_leaves_the_kv_empty_and_the_output_unchanged(tiny_gguf, options):
    """The load-time throw-away decode (llama.cpp tools' warm-up) runs in every context and leaves nothing behind."""
    import llama_cpp as lib

    if "draft" in options:
        options = {"draft": tiny_gguf["q8_0"]}
    outputs = []
    for warmup in (False, True):
        with edgelm.load(n_ctx=256, n_threads=2, prefix_cache_bytes=0, warmup=warmup, **options) as m:
            contexts = [m.ctx, *(c for c in (m._draft_ctx, m._pair and m._pair.t) if c)]
            assert all(lib.llama_memory_seq_pos_max(c.memory, 0) == -1 and not c.seq_tokens(0) for c in contexts)
            outputs.append(m.generate("The little dog", max_tokens=16, temperature=0).tokens)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 16


@pytest.mark.parametrize("which", ["bundled", "stories"])
def test_generate_is_what_the_stream_joins_to(which, request):
    """generate() without stop strings decodes the text once at the end; it must equal the stream's chunks, split
    UTF-8 (byte-fallback tokens of the SentencePiece stories model) included."""
    path = request.getfixturevalue("stories") if which == "stories" else None
    with edgelm.load(path, n_ctx=256, n_threads=2, prefix_cache_bytes=0) as m:
        for seed in range(4):
            for prompt in ("Once upon a time", "Lily saw a café", "日本の"):
                whole = m.generate(prompt, max_tokens=32, temperature=1.0, seed=seed, logprobs=0)
                chunks = list(m.stream(prompt, max_tokens=32, temperature=1.0, seed=seed, logprobs=0))
                assert whole.text == "".join(c.text for c in chunks)
                assert whole.tokens == [t for c in chunks for t in c.tokens]
                assert whole.finish_reason == chunks[-1].finish_reason
                assert [lp.token for lp in whole.logprobs] == whole.tokens
