"""Speculative decoding inside the engine (edgelm/drafting.py): prompt lookup and a draft model verified in the
shared decode step, on the bundled small model (the tiny reference model drafts for it: same tokenizer)."""
from __future__ import annotations

import inspect
import json
import shlex
import textwrap
import time

import numpy as np
import pytest

import edgelm
from edgelm.engine import Engine, EngineOptions
from edgelm.errors import UsageError
from edgelm.runtime.model import LlamaModel, LoadOptions, default_model_path
from edgelm.runtime.sampling import SamplingParams

from test_server import ServerProcess


def copying_prompt(fn) -> str:
    """A function's source, then its first line again: greedy continuations repeat much of it (lookup's case)."""
    src = inspect.getsource(fn)
    return src + "\n\n" + src.splitlines()[0] + "\n"


# short prompts, and prompts of 100-700 tokens that a continuation copies from (past 512 KV cells llama.cpp's flash
# attention decodes a lone query another way than a batch of them)
PROMPTS = ["def main():\n", "import numpy as np\n", "Once upon a time",
           copying_prompt(textwrap.dedent), copying_prompt(shlex.split), copying_prompt(json.dumps)]


@pytest.fixture(scope="module")
def small():
    with LlamaModel(default_model_path(), LoadOptions()) as m:
        yield m


@pytest.fixture(scope="module")
def tiny_draft(tiny_gguf):
    with LlamaModel(tiny_gguf["q8_0"], LoadOptions()) as m:
        yield m


def params(**kw) -> SamplingParams:
    return SamplingParams.from_kwargs(**{"temperature": 0, "max_tokens": 96, "ignore_eos": True, **kw})


NEAR_TIE = 0.05  # log-probability: candidates this close may swap when rows are evaluated in other batches


def run(model, prompts, p: SamplingParams | list[SamplingParams], n_parallel=3, draft_model=None, **options):
    """(completions, engine stats) of `prompts` decoded together."""
    ps = p if isinstance(p, list) else [p] * len(prompts)
    options.setdefault("draft_cost_model", False)  # as many drafts as fit: their cost here is not what is tested
    opts = EngineOptions(n_parallel=n_parallel, n_ctx=1024, n_threads=2, **options)
    with Engine(model, opts, threaded=False, draft_model=draft_model) as engine:
        reqs = engine.submit_many([(model.tokenize(t), q) for t, q in zip(prompts, ps)])
        engine.run_until_idle()
        return [r.result() for r in reqs], dict(engine.stats)


@pytest.fixture(scope="module")
def plain(small):
    """Without drafts, each prompt alone, with the top two candidates of every step."""
    return run(small, PROMPTS, params(logprobs=2), n_parallel=1)[0]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def assert_plain_output(out, ref) -> None:
    """`out` has `ref`'s tokens, or parts from them first at a near tie of `ref`'s own top two candidates: a verified
    draft's row can round differently from the lone row of a one-token step (runtime/speculative.py)."""
    j = first_difference(out.tokens, ref.tokens)
    if j is None:
        return
    chosen = ref.logprobs[j]
    other = dict(chosen.top).get(out.tokens[j])
    assert other is not None and chosen.logprob - other < NEAR_TIE, (
        f"parts from plain decoding at token {j} where plain decoding's choice leads by "
        f"{chosen.logprob - (other if other is not None else float('-inf')):.4f}")


def assert_mostly_identical(outs, refs) -> None:
    for out, ref in zip(outs, refs):
        assert_plain_output(out, ref)
    assert sum(o.tokens == r.tokens for o, r in zip(outs, refs)) >= len(refs) - 2


@pytest.mark.parametrize("n_parallel", [1, 3])
def test_lookup_keeps_greedy_output_exactly(small, plain, n_parallel):
    out, stats = run(small, PROMPTS, params(), n_parallel=n_parallel, lookup=True)
    assert_mostly_identical(out, plain)
    assert all(c.finish_reason == "length" and c.timings.completion_tokens == 96 for c in out)
    # drafts were made and kept: the copying prompts' continuations repeat their source
    assert stats["drafted"] > 50 and stats["draft_accepted"] > 20 and stats["draft_rounds"] > 0
    # each kept draft saves a stream a step; alone, exactly one decode step
    plain_steps = run(small, PROMPTS, params(), n_parallel=n_parallel)[1]["steps"]
    if n_parallel == 1:
        assert stats["steps"] == plain_steps - stats["draft_accepted"]
    else:
        assert stats["steps"] < plain_steps


def test_a_draft_model_keeps_greedy_output_exactly(small, plain, tiny_draft):
    out, stats = run(small, PROMPTS, params(), draft_model=tiny_draft, draft_threshold=0.3)
    assert_mostly_identical(out, plain)
    assert stats["drafted"] > 50 and 0 < stats["draft_accepted"] <= stats["drafted"]


def test_a_draft_model_drafts_for_every_stream_at_once(small, tiny_draft):
    """Speculation.draft_many: one draft-model decode per draft position holds a row for each stream still
    drafting (and the first one catches every stream up), not one decode per stream and position."""
    calls = []
    opts = EngineOptions(n_parallel=3, n_ctx=1024, n_threads=2, draft_cost_model=False)
    with Engine(small, opts, threaded=False, draft_model=tiny_draft) as engine:
        ctx = engine.speculation.ctx
        real = ctx.decode_rows
        ctx.decode_rows = lambda rows: (calls.append(rows), real(rows))[1]
        reqs = engine.submit_many([(small.tokenize(p), params(max_tokens=48)) for p in PROMPTS[:3]])
        engine.run_until_idle()
        assert [r.result().timings.completion_tokens for r in reqs] == [48] * 3
        assert engine.stats["draft_accepted"] > 0
    streams = [len({seq for _, _, seq, _ in rows}) for rows in calls]
    assert max(streams) == 3 and sum(streams) > len(calls)
    # each stream's prompt is caught up once: later batches add only its newly kept tokens
    caught_up = sum(len(rows) for rows in calls) - sum(1 for rows in calls for row in rows if row[3])
    assert caught_up < sum(len(small.tokenize(p)) for p in PROMPTS[:3]) + 3 * 48


def test_limits_hold_with_drafts(small):
    """max_tokens, stop strings, end of text and the context end are met where they are without drafts, even when
    a kept draft would run past them."""
    cases = [params(max_tokens=7, logprobs=2), params(max_tokens=40, stop=["\n\n"], logprobs=2),
             params(max_tokens=60, ignore_eos=False, logprobs=2)]
    prompts = [PROMPTS[3]] * len(cases)
    ref, _ = run(small, prompts, cases, n_parallel=2)
    out, stats = run(small, prompts, cases, n_parallel=2, lookup=True)
    assert stats["draft_accepted"] > 0
    for a, b in zip(out, ref):
        assert_plain_output(a, b)
        if a.tokens == b.tokens:
            assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
    assert out[0].timings.completion_tokens == 7 and out[0].finish_reason == "length"
    assert out[1].finish_reason == "stop" and "\n\n" not in out[1].text
    # the sequence's context: 1024 positions for a prompt of ~480 tokens and 2000 asked for
    n_prompt = len(small.tokenize(PROMPTS[3]))
    long, _ = run(small, [PROMPTS[3]], params(max_tokens=2000), n_parallel=1, lookup=True)
    ref_long, _ = run(small, [PROMPTS[3]], params(max_tokens=2000), n_parallel=1)
    assert long[0].finish_reason == ref_long[0].finish_reason == "length"
    assert long[0].timings.completion_tokens == ref_long[0].timings.completion_tokens == 1024 - n_prompt


def test_logprobs_and_logit_bias_with_drafts(small):
    """A kept draft's logprobs come from the row that verified it; greedy with a logit bias still drafts."""
    banned = small.tokenize("\n", add_special=False)[0]
    p = params(max_tokens=48, logprobs=3, logit_bias={banned: -100.0})
    ref, _ = run(small, PROMPTS[3:5], p, n_parallel=2)
    out, stats = run(small, PROMPTS[3:5], p, n_parallel=2, lookup=True)
    assert stats["draft_accepted"] > 0
    for a, b in zip(out, ref):
        assert_plain_output(a, b)
        assert banned not in a.tokens
        n = first_difference(a.tokens, b.tokens) or len(a.tokens)  # rows evaluated in other batches: rounding only
        assert np.allclose([lp.logprob for lp in a.logprobs[:n]], [lp.logprob for lp in b.logprobs[:n]], atol=0.02)
        assert [lp.token for lp in a.logprobs] == a.tokens


def test_sampling_drafts_and_stateful_samplers_do_not(small):
    """Sampling takes drafts by speculative rejection sampling (seeded: the same output twice); penalties and
    grammars, whose state a rejected draft would have advanced, decode plainly, with the plain engine's output."""
    sampled = params(temperature=0.7, top_k=20, seed=5, max_tokens=64)
    a, stats = run(small, PROMPTS[3:], sampled, lookup=True)
    b, _ = run(small, PROMPTS[3:], sampled, lookup=True)
    assert [c.tokens for c in a] == [c.tokens for c in b] and stats["draft_accepted"] > 0
    for stateful in (params(repeat_penalty=1.3), params(grammar='root ::= [a-z ]+ "."', max_tokens=30)):
        out, stats = run(small, PROMPTS[3:5], stateful, n_parallel=2, lookup=True)
        ref, _ = run(small, PROMPTS[3:5], stateful, n_parallel=2)
        assert stats["drafted"] == 0
        assert [c.tokens for c in out] == [c.tokens for c in ref]


def test_generate_batch_and_cancel_with_lookup(small):
    with edgelm.load(n_ctx=1024, n_threads=2, lookup=True, prefix_cache_bytes=0) as m:
        batch = m.generate_batch(PROMPTS[3:5], n_parallel=2, max_tokens=40, temperature=0, ignore_eos=True)
    ref, stats = run(small, PROMPTS[3:5], params(max_tokens=40), n_parallel=2, lookup=True)
    assert [c.tokens for c in batch] == [c.tokens for c in ref] and stats["draft_accepted"] > 0
    opts = EngineOptions(n_parallel=1, n_ctx=1024, n_threads=2, lookup=True)
    with Engine(small, opts) as engine:
        req = engine.submit(small.tokenize(PROMPTS[3]), params(max_tokens=900))
        it = iter(req)
        for _ in range(10):
            next(it)
        req.cancel()
        assert req.wait(10) and req.finish_reason == "cancelled" and req.timings.completion_tokens < 900
        deadline = time.time() + 5
        while engine.active and time.time() < deadline:
            time.sleep(0.01)
        assert engine.active == 0
        after = engine.submit(small.tokenize(PROMPTS[4]), params()).result()
    assert after.tokens == run(small, [PROMPTS[4]], params(), n_parallel=1, lookup=True)[0][0].tokens


@pytest.mark.parametrize("options, match", [
    ({"lookup": True, "draft_max": 0}, "draft_max"),
    ({"lookup": True, "draft_max": True}, "draft_max"),
    ({"lookup": True, "draft_threshold": 1.5}, "threshold"),
])
def test_bad_draft_options(small, options, match):
    with pytest.raises(UsageError, match=match):
        Engine(small, EngineOptions(n_ctx=256, **options))


def test_lookup_and_a_draft_model_together_are_refused(small, tiny_draft):
    with pytest.raises(UsageError, match="choose one drafter"):
        Engine(small, EngineOptions(n_ctx=256, lookup=True), draft_model=tiny_draft)


def test_a_draft_model_with_another_vocabulary_is_refused(small, rand):
    with LlamaModel(rand["model"], LoadOptions()) as other, pytest.raises(UsageError, match="vocabulary"):
        Engine(small, EngineOptions(n_ctx=256), draft_model=other)


def test_serve_with_lookup(small, plain):
    """`edgelm serve --lookup`: the completions of the engine without drafts (up to near ties), and /metrics counts
    drafts."""
    from types import SimpleNamespace

    s = ServerProcess("--parallel", "2", "--ctx", "1024", "--lookup", "-fa", "off")
    try:
        import httpx

        for prompt, ref in zip(PROMPTS[3:5], plain[3:5]):
            body = {"prompt": prompt, "max_tokens": 96, "temperature": 0, "ignore_eos": True}
            r = httpx.post(s.base + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert small.tokenize(ref.text, add_special=False) == ref.tokens  # so the text's tokens are comparable
            assert_plain_output(SimpleNamespace(tokens=small.tokenize(r.json()["choices"][0]["text"],
                                                                      add_special=False)), ref)
        m = s.metrics()
        assert m["edgelm_draft_tokens_accepted_total"] > 0
        assert m["edgelm_draft_tokens_total"] >= m["edgelm_draft_tokens_accepted_total"]
    finally:
        err = s.stop()
    assert "Traceback" not in err, err[-3000:]


def test_the_cost_model_drafts_where_rows_are_cheap_and_streams_agree(small):
    """Speculation.allot: a stream that keeps its drafts gets more than one that does not; cheap rows buy more drafts
    than dear ones; beside other streams, a compute-bound step drafts less."""
    from edgelm.drafting import PROBE, Speculation, StepCosts
    from edgelm.runtime.context import ContextOptions

    spec = Speculation(small, ContextOptions(n_ctx=256), lookup=True)
    good, bad = spec.start(0, params(), _greedy(small)), spec.start(1, params(), _greedy(small))
    good.kept, good.rejected = 9.0, 1.0  # keeps a draft after a kept one 90% of the time
    bad.kept, bad.rejected = 1.0, 1.0  # 50%
    spec.costs = StepCosts(0.010, 0.001)  # memory-bound: a row costs a tenth of the step
    cheap = spec.allot([(good, 8), (bad, 8)])
    assert cheap[0] == 8 and 0 < cheap[1] < cheap[0]
    spec.costs = StepCosts(0.001, 0.001)  # compute-bound: a row costs as much as the step
    dear = spec.allot([(good, 8), (bad, 8)])
    assert dear[1] == 0 and 0 < dear[0] < 8
    alone = spec.allot([(good, 8)])
    beside = spec.allot([(good, 8)] + [(bad, 8)] * 3)
    assert beside[0] < alone[0]
    assert spec.allot([(good, 2)]) == [2]  # never more than fits
    # a stream kept from drafting tries one draft every PROBE steps, so its acceptance rate can still change
    bad.idle = 0
    probes = [spec.allot([(good, 8), (bad, 8)])[1] for _ in range(3 * PROBE)]
    assert probes.count(1) == 3 and probes.count(0) == 3 * PROBE - 3 and probes[PROBE - 1] == 1
    assert spec.allot([(bad, 0)]) == [0]  # not where no draft fits
    # beside three streams, where a row costs three steps' fixed part, even a draft kept 90% of the time would
    # not pay: no probes
    spec.costs = StepCosts(0.001, 0.003)
    assert not any(any(spec.allot([(bad, 8)] * 4)) for _ in range(3 * PROBE))
    spec.close()


def test_step_costs_follow_the_engines_own_steps():
    """StepCosts: the calibration's line until steps say more; a uniform slow-down moves the line but keeps its
    shape (so the cost model's choices stay); steps of several widths fit their own line."""
    from edgelm.drafting import StepCosts

    costs = StepCosts()
    costs.calibrated(0.0010, 0.0026)  # 0.8 ms a step, 0.2 ms a row
    assert costs.fit() == pytest.approx((0.0008, 0.0002))
    for _ in range(300):  # another process takes half the cores: one-row steps run twice as long
        costs.observe(1, 0.0020)
    step, row = costs.fit()
    assert step == pytest.approx(0.0016, rel=0.02) and row == pytest.approx(0.0004, rel=0.02)
    rng = np.random.default_rng(0)
    for _ in range(300):  # drafting streams: widths 1-9 whose rows cost as much as the step
        rows = int(rng.integers(1, 10))
        costs.observe(rows, 0.0005 + 0.0005 * rows)
    step, row = costs.fit()
    assert step == pytest.approx(0.0005, rel=0.1) and row == pytest.approx(0.0005, rel=0.1)


def test_the_engine_times_its_decode_only_steps_for_the_cost_model(small):
    """Every step without a prompt chunk is one observation; the fitted costs stay positive and finite."""
    opts = EngineOptions(n_parallel=1, n_ctx=1024, n_threads=2, lookup=True)
    with Engine(small, opts, threaded=False) as engine:
        req = engine.submit(small.tokenize(PROMPTS[0]), params(max_tokens=48))
        engine.run_until_idle()
        assert req.result().timings.completion_tokens == 48
        costs = engine.speculation.costs
        assert costs.seen == engine.stats["steps"] - 1  # all but the prompt's one step
        step, row = costs.fit()
        assert 0 < step < 1 and 0 <= row < 1


def _greedy(model):
    from edgelm.runtime.sampling import SamplerChain

    return SamplerChain(SamplingParams(temperature=0), model, 256)
