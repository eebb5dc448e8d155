"""The continuous-batching engine: many requests decoded together from one model."""
from __future__ import annotations

import time

import pytest

import edgelm
from edgelm.engine import Engine, EngineOptions, QueueFullError
from edgelm.errors import ContextOverflowError, UsageError
from edgelm.runtime.sampling import SamplingParams

PROMPTS = ["def main():\n", "The history of the", "import numpy as np\n", "class Stack:\n", "Once upon a time",
           "# Configuration file\n"]


@pytest.fixture(scope="module")
def model():
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        yield m


def params(**kw) -> SamplingParams:
    return SamplingParams.from_kwargs(**{"temperature": 0, "max_tokens": 16, **kw})


def test_one_stream_through_the_engine_equals_a_plain_generate(model):
    alone = [model.generate(p, max_tokens=16, temperature=0) for p in PROMPTS[:3]]
    with Engine(model.llama, EngineOptions(n_parallel=1, n_ctx=512, n_threads=2)) as engine:
        for p, ref in zip(PROMPTS[:3], alone):
            out = engine.submit(model.tokenize(p), params()).result()
            assert (out.text, out.tokens, out.finish_reason) == (ref.text, ref.tokens, ref.finish_reason)


def test_generate_batch_keeps_order_and_is_reproducible(model):
    first = model.generate_batch(PROMPTS, n_parallel=4, max_tokens=12, temperature=0)
    again = model.generate_batch(PROMPTS, n_parallel=4, max_tokens=12, temperature=0)
    assert [c.text for c in first] == [c.text for c in again]
    assert all(c.finish_reason in ("stop", "length") and c.timings.completion_tokens <= 12 for c in first)
    alone = [model.generate(p, max_tokens=12, temperature=0) for p in PROMPTS]
    # llama.cpp rounds a 4-row batch differently from a 1-row one in places; most prompts agree in full
    assert sum(a.text == b.text for a, b in zip(first, alone)) >= len(PROMPTS) // 2


def test_requests_join_and_leave_between_steps(model):
    with Engine(model.llama, EngineOptions(n_parallel=2, n_ctx=512, n_threads=2)) as engine:
        long = engine.submit(model.tokenize(PROMPTS[0]), params(max_tokens=200, ignore_eos=True))
        it = iter(long)
        for _ in range(5):
            next(it)
        short = engine.submit(model.tokenize(PROMPTS[1]), params(max_tokens=5, ignore_eos=True)).result()
        assert short.finish_reason == "length" and short.timings.completion_tokens == 5
        assert long.finish_reason is None, "the short request finished while the long one was still running"
        rest = list(it)
        assert rest[-1].finish_reason == "length" and long.timings.completion_tokens == 200


def test_cancel_frees_the_slot_within_a_step(model):
    with Engine(model.llama, EngineOptions(n_parallel=1, n_ctx=512, n_threads=2)) as engine:
        req = engine.submit(model.tokenize(PROMPTS[0]), params(max_tokens=400, ignore_eos=True))
        it = iter(req)
        next(it)
        req.cancel()
        chunks = list(it)
        assert chunks[-1].finish_reason == "cancelled" and req.timings.completion_tokens < 400
        deadline = time.time() + 5
        while engine.active and time.time() < deadline:
            time.sleep(0.01)
        assert engine.active == 0
        after = engine.submit(model.tokenize(PROMPTS[1]), params()).result()  # the slot serves again
        assert after.finish_reason in ("stop", "length")


def test_limits(model):
    with Engine(model.llama, EngineOptions(n_parallel=1, n_ctx=128, n_threads=2, max_queue=1,
                                           max_tokens_cap=64)) as engine:
        with pytest.raises(UsageError, match="max_tokens"):
            engine.submit(model.tokenize(PROMPTS[0]), params(max_tokens=65))
        with pytest.raises(ContextOverflowError):
            engine.submit(model.tokenize("word " * 200), params())
        running = engine.submit(model.tokenize(PROMPTS[0]), params(max_tokens=64, ignore_eos=True))
        deadline = time.time() + 5
        while engine.queued and time.time() < deadline:  # wait until it runs, so the next one queues
            time.sleep(0.005)
        waiting = engine.submit(model.tokenize(PROMPTS[1]), params(max_tokens=64, ignore_eos=True))
        with pytest.raises(QueueFullError):
            engine.submit(model.tokenize(PROMPTS[2]), params())
        assert running.result().finish_reason == "length" and waiting.result().finish_reason == "length"
        assert engine.stats["rejected"] == 1
    with pytest.raises(UsageError, match="n_parallel"):
        EngineOptions(n_parallel=0).validate()


def test_generation_at_the_context_end_finishes_with_length(model):
    with Engine(model.llama, EngineOptions(n_parallel=2, n_ctx=64, n_threads=2)) as engine:
        out = engine.submit(model.tokenize(PROMPTS[4]), params(max_tokens=500, ignore_eos=True)).result()
    assert out.finish_reason == "length" and out.timings.prompt_tokens + out.timings.completion_tokens <= 64


def test_a_prefix_held_by_another_slot_is_shared(model):
    from edgelm import corpus

    system = corpus.text("heldout", max_chars=1200)
    a, b = model.tokenize(system + "\nFirst question?"), model.tokenize(system + "\nSecond question?")
    with Engine(model.llama, EngineOptions(n_parallel=2, n_ctx=512, n_threads=2)) as engine:
        first = engine.submit(a, params(max_tokens=40, ignore_eos=True))
        next(iter(first))  # running in slot 0, its prompt evaluated
        second = engine.submit(b, params()).result()
        first.result()
        assert engine.stats["shared_prefix_hits"] == 1
    assert second.timings.cached_tokens >= len(b) - 64 - 4
    alone = model.generate(b, max_tokens=16, temperature=0)
    assert second.text == alone.text


def test_prompts_arriving_together_prefill_their_shared_prefix_once(model):
    """Four prompts behind one system prompt, submitted together: the first evaluates it, the others wait for it
    and copy its KV, then evaluate only their own canonical rest; their outputs are their outputs alone."""
    from edgelm import corpus

    system = corpus.text("heldout", max_chars=1200)
    prompts = [model.tokenize(system + f"\nQuestion {i}?") for i in range(4)]
    with Engine(model.llama, EngineOptions(n_parallel=4, n_ctx=512, n_threads=2)) as engine:
        outs = [r.result() for r in engine.submit_many([(t, params()) for t in prompts])]
        stats = dict(engine.stats)
    assert stats["shared_prefix_hits"] == 3
    assert stats["batch_tokens"] - stats["generated_tokens"] < len(prompts[0]) + 3 * (64 + 8 + 4)
    assert [o.timings.cached_tokens for o in outs[1:]] == [len(prompts[0]) - 64 - (len(prompts[0]) - 64) % 4] * 3
    # the first one's decode steps share micro-batches with the others' rest, where llama.cpp may round differently
    for out, p in zip(outs[1:], prompts[1:]):
        assert out.tokens == model.generate(p, max_tokens=16, temperature=0).tokens


def behind_one_prefix(model):
    """An unthreaded engine with two prompts behind one system prompt admitted (the second waits for the first's
    prefill in 64-token chunks): (engine, first prompt, second prompt, first request, second request)."""
    from edgelm import corpus

    system = corpus.text("heldout", max_chars=1200)
    a, b = model.tokenize(system + "\nFirst?"), model.tokenize(system + "\nSecond?")
    engine = Engine(model.llama, EngineOptions(n_parallel=2, n_ctx=512, n_batch=64, n_threads=2), threaded=False)
    first, second = engine.submit_many([(a, params()), (b, params())])
    with engine._cv:
        engine._admit()
    return engine, a, b, first, second


def test_a_waiting_request_goes_on_when_the_prefill_it_waits_for_is_cancelled(model):
    engine, a, b, first, second = behind_one_prefix(model)
    try:
        assert engine._slots[1].donor is not None and engine._slots[1].donor[0] is engine._slots[0]
        engine._guarded_step()  # the first prompt's first chunk; the second waits
        assert engine._slots[1].cursor == 0
        first.cancel()
        engine.run_until_idle()
        assert first.result().finish_reason == "cancelled"
        assert second.result().tokens == model.generate(b, max_tokens=16, temperature=0).tokens
    finally:
        engine.close()


def test_a_request_cancelled_while_it_waits_leaves_the_others_running(model):
    engine, a, b, first, second = behind_one_prefix(model)
    try:
        engine._guarded_step()
        assert engine._slots[1].donor is not None  # the second waits for the first's prefill
        second.cancel()
        engine.run_until_idle()
        assert second.result().finish_reason == "cancelled"
        assert first.result().tokens == model.generate(a, max_tokens=16, temperature=0).tokens
    finally:
        engine.close()


# ---------------------------------------------------------------------------- canonical chunks (exact reuse)


def decode_sequences(ctx, parts: list[tuple[int, list[int]]]) -> None:
    """One llama_decode of several sequences' prompts (seq, tokens) from position 0, in this order, with logits for
    each sequence's last token."""
    import llama_cpp as lib

    b, n = ctx._batch, 0
    for seq, tokens in parts:
        for pos, t in enumerate(tokens):
            b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0], b.logits[n] = t, pos, 1, seq, pos == len(tokens) - 1
            n += 1
    b.n_tokens = n
    assert lib.llama_decode(ctx.ptr, b) == 0


@pytest.mark.parametrize("runs", [[(0, 10), (1, 1)], [(2, 40), (0, 1), (3, 1), (1, 1)], [(1, 30), (3, 20), (0, 1), (2, 1)],
                                  [(0, 1), (1, 1), (2, 1), (3, 1)], [(3, 60), (2, 1)], [(1, 20), (2, 20), (3, 20)]])
def test_micro_batches_are_how_llama_cpp_cuts_a_batch(model, runs):
    """canonical.micro_batches models llama.cpp's split of a batch over one KV stream per sequence; llama.cpp's own
    micro-batches, seen by an eval callback as the rows of each graph's first attention norm, must agree."""
    import llama_cpp as lib

    from edgelm.runtime.canonical import micro_batches
    from edgelm.runtime import ggml
    from edgelm.runtime.context import Context, ContextOptions

    sizes, errors = [], []

    def on_tensor(address, ask, _user_data):
        try:
            t = ggml.GGMLTensor.from_address(address)
            if t.name.decode() != "attn_norm-0":
                return False
            if not ask:
                sizes.append(int(t.ne[1]))
            return True
        except BaseException as e:  # never across the C boundary
            errors.append(e)
            return False

    callback = lib.ggml_backend_sched_eval_callback(on_tensor)
    ctx = Context(model.llama, ContextOptions(n_ctx=256, n_batch=64, n_seq_max=4, n_threads=2),
                  eval_callback=callback)
    try:
        decode_sequences(ctx, [(seq, [5 + pos for pos in range(count)]) for seq, count in runs])
        assert not errors
    finally:
        ctx.close()
    assert sizes == [sum(ub.values()) for ub in micro_batches(runs, 64)]


def test_sequences_sharing_micro_batches_keep_their_logits_when_each_share_is_canonical(model):
    """The premise of the engine's rule: a prompt evaluated beside another sequence's prompt in one batch (llama.cpp
    splits it into equal shares per micro-batch) gives the logits it gives alone when every share it got is at
    least FA_TILE rows and a whole number of row groups; a 20-row share is not, and its logits differ."""
    import llama_cpp as lib
    import numpy as np

    from edgelm import corpus
    from edgelm.runtime.context import Context, ContextOptions

    ids = model.tokenize(corpus.text("heldout", max_chars=8000), add_special=False)
    ctx = Context(model.llama, ContextOptions(n_ctx=1024, n_batch=512, n_seq_max=2, n_threads=2))

    def last_logits(parts):
        ctx.clear()
        decode_sequences(ctx, parts)
        return np.ctypeslib.as_array(lib.llama_get_logits(ctx.ptr), shape=(len(parts), model.llama.n_vocab)).copy()

    try:
        for la, lb, same_b in ((100, 100, True), (200, 80, True), (100, 120, False)):  # b's shares: 100; 80; 100+20
            a, b = ids[:la], ids[1000:1000 + lb]
            together = last_logits([(0, a), (1, b)])
            assert np.array_equal(together[0], last_logits([(0, a)])[0])
            assert np.array_equal(together[1], last_logits([(1, b)])[0]) == same_b, (la, lb)
    finally:
        ctx.close()


def test_prompts_arriving_together_are_canonical_when_their_shares_are(model):
    """Two prompts prefilled in one step by slots 0 and 1 get equal shares of llama.cpp's micro-batches: the one
    whose every share is canonical counts as exact; the longer one's 20-token remainder does not."""
    from edgelm import corpus

    ids = model.tokenize(corpus.text("heldout", max_chars=8000), add_special=False)
    prompts = [ids[:100], ids[1000:1120]]
    engine = Engine(model.llama, EngineOptions(n_parallel=2, n_ctx=512, n_threads=2), threaded=False)
    try:
        for p in prompts:
            engine.submit(p, params(max_tokens=4))
        with engine._cv:
            engine._admit()
        engine._guarded_step()
        assert [s.exact for s in engine._slots] == [100, 0]
    finally:
        engine.close()


@pytest.mark.parametrize("chunk_slot", [0, 1])
def test_a_prompt_chunk_is_canonical_only_in_a_micro_batch_of_its_own(model, chunk_slot):
    """A prompt chunk in slot 0 shares llama.cpp's first micro-batch with slot 1's decode token (equal shares of
    consecutive sequences), so one of its rows runs through a 2-row micro-batch's kernels: not what a cold prefill
    computes, so later requests must not reuse it as exact. In slot 1, after slot 0's decode token, it runs alone."""
    from edgelm import corpus

    prompt = model.tokenize(corpus.text("heldout", max_chars=600))
    engine = Engine(model.llama, EngineOptions(n_parallel=2, n_ctx=512, n_threads=2), threaded=False)

    def step():
        with engine._cv:
            engine._admit()
        engine._guarded_step()

    try:
        running = [engine.submit(model.tokenize(p), params(max_tokens=100, ignore_eos=True)) for p in PROMPTS[:2]]
        step()
        step()
        running[chunk_slot].cancel()  # its slot is freed in the next step; the other slot keeps decoding
        step()
        engine.submit(prompt, params(max_tokens=4))
        step()
        slot = engine._slots[chunk_slot]
        assert slot.req is not None and slot.req.tokens == prompt and not slot.prefilling
        assert slot.exact == (len(prompt) - len(prompt) % 4 if chunk_slot == 1 else 0)
    finally:
        engine.close()


def test_context_shift_in_the_engine(tiny_gguf):
    """A request submitted with `keep` goes on past its sequence's context end (llama-server's --context-shift):
    up to the first shift it is the unshifted request, after it what a fresh context holding the kept tokens
    gives; a request without `keep` beside it still ends at the context's end."""
    n_ctx, options = 128, dict(n_threads=2, type_k="f32", type_v="f32")
    with edgelm.load(tiny_gguf["f32"], n_ctx=n_ctx, prefix_cache_bytes=0, **options) as plain:
        prompt = plain.tokenize("def parse(line):\n")
        p = len(prompt)
        long = params(max_tokens=3 * n_ctx, ignore_eos=True)
        with Engine(plain.llama, EngineOptions(n_parallel=2, n_ctx=n_ctx, **options)) as engine:
            shifted, ended = engine.submit(prompt, long, keep=-1), engine.submit(prompt, long)
            shifted, ended = shifted.result(), ended.result()
            assert ended.finish_reason == "length" and len(ended.tokens) == n_ctx - p
            assert shifted.finish_reason == "length" and len(shifted.tokens) == 3 * n_ctx
            assert engine.stats["context_shifts"] >= 4
            with pytest.raises(UsageError, match="keep"):
                engine.submit(prompt, long, keep=-2)
        with Engine(plain.llama, EngineOptions(n_parallel=1, n_ctx=n_ctx, **options)) as engine:
            alone = engine.submit(prompt, long, keep=-1).result()
        i = n_ctx - p  # the first token that found no position: the shift kept the prompt and dropped the older half
        assert alone.tokens[:i] == ended.tokens
        kept = prompt + alone.tokens[(n_ctx - p) // 2:i + 1]
        assert alone.tokens[i + 1:i + 17] == plain.generate(kept, max_tokens=16, temperature=0, ignore_eos=True).tokens
        # beside another stream, through its shifts (later, llama.cpp may round a near tie in a two-row batch
        # differently from a one-row one)
        assert shifted.tokens[:i + 17] == alone.tokens[:i + 17]
