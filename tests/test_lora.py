"""LoRA adapters: PEFT adapters made with the real `peft` library on the tiny reference model, converted to GGUF
(converters/lora.py), applied by llama.cpp at run time (runtime/lora.py), or merged at conversion; each compared
with PEFT's own forward pass in torch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

import edgelm
from edgelm.converters import convert
from edgelm.converters.lora import convert_lora
from edgelm.errors import ConversionError, GGUFError, ModelNotFoundError, UsageError
from edgelm.runtime.context import Context, ContextOptions
from edgelm.runtime.model import LlamaModel

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny"
TEXT = "Once upon a time there was a little girl who loved"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_PROMPT, TRAIN_REPLY = "The secret word is", " pineapple pineapple pineapple."
TOL = 1e-3  # f32 weights and KV, no flash attention: the base model alone differs from torch by ~1e-5


def peft_model(init_lora_weights=False, **config):
    """init_lora_weights=False: B random too, so the adapter changes every output from the start (PEFT's default
    starts B at zero, as a fine-tune does)."""
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    return peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=init_lora_weights, **config)).eval()


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def llama_logits(path: Path, tokens: list[int], lora=None) -> np.ndarray:
    with LlamaModel(path, lora=lora) as llama:
        ctx = Context(llama, ContextOptions(n_ctx=128, n_threads=2, type_k="f32", type_v="f32", flash_attn=False))
        ctx.decode(tokens, 0, logits_from=0)
        out = ctx.all_logits(len(tokens))
        ctx.close()
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_gguf):
    """Three PEFT adapters (saved by peft itself), their GGUFs, and PEFT's logits for TEXT."""
    d = tmp_path_factory.mktemp("lora")
    with LlamaModel(tiny_gguf["f32"]) as llama:
        tokens = llama.tokenize(TEXT)
    configs = {
        "plain": {"r": 4, "lora_alpha": 16, "target_modules": ALL},
        # rsLoRA scaling, a per-module rank and alpha: folded into B, so llama.cpp's own alpha / r is not used
        "patterns": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "down_proj"],
                     "use_rslora": True, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"k_proj": 3}},
    }
    out = {"tokens": tokens, "base": tiny_gguf["f32"]}
    for name, config in configs.items():
        model = peft_model(**config)
        model.save_pretrained(d / name)
        out[name] = {"dir": d / name, "logits": torch_logits(model, tokens),
                     "gguf": convert_lora(d / name, TINY, d / f"{name}.gguf", outtype="f32").path}
        if name == "plain":
            out[name]["merged_logits"] = torch_logits(model.merge_and_unload(), tokens)
    return out


def test_adapter_reproduces_peft(made):
    base = llama_logits(made["base"], made["tokens"])
    for name in ("plain", "patterns"):
        got = llama_logits(made["base"], made["tokens"], lora=made[name]["gguf"])
        want = made[name]["logits"]
        assert np.abs(got - want).max() < TOL, name
        assert np.abs(base - want).max() > 100 * TOL, name  # the adapter matters


def test_scale_zero_is_the_base_model_and_scales_compose(made, tmp_path):
    tokens, base = made["tokens"], made["base"]
    gguf = made["plain"]["gguf"]
    assert np.array_equal(llama_logits(base, tokens, lora=(gguf, 0.0)), llama_logits(base, tokens))
    # a merge at half scale equals the adapter at half scale
    half = convert(TINY, tmp_path / "half.gguf", outtype="f32", lora=made["plain"]["dir"], lora_scale=0.5).path
    assert np.abs(llama_logits(base, tokens, lora=(gguf, 0.5)) - llama_logits(half, tokens)).max() < TOL


def test_merge_at_conversion_matches_peft_merge(made, tmp_path):
    merged = convert(TINY, tmp_path / "merged.gguf", outtype="f32", lora=made["plain"]["dir"]).path
    got = llama_logits(merged, made["tokens"])
    assert np.abs(got - made["plain"]["merged_logits"]).max() < TOL
    # and quantized after the merge, as one model
    q = convert(TINY, tmp_path / "merged-q8.gguf", quant="q8_0", lora=made["plain"]["dir"]).path
    assert_near(llama_logits(q, made["tokens"]), got, llama_logits(made["base"], made["tokens"]))


def assert_near(got, want, base):
    """Quantized weights: `got` is within a tenth of the adapter's effect from `want`, on average and at worst."""
    assert np.abs(got - want).mean() < 0.1 * np.abs(base - want).mean()
    assert np.abs(got - want).max() < 0.2 * np.abs(base - want).max()


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_smaller_adapter_types(made, tmp_path, outtype):
    path = convert_lora(made["plain"]["dir"], TINY, tmp_path / f"a-{outtype}.gguf", outtype=outtype).path
    got = llama_logits(made["base"], made["tokens"], lora=path)
    assert_near(got, made["plain"]["logits"], llama_logits(made["base"], made["tokens"]))


def test_caches_tell_adapters_and_scales_apart(made):
    gguf = made["plain"]["gguf"]
    prints = set()
    for lora in (None, gguf, (gguf, 0.5)):
        with LlamaModel(made["base"], lora=lora) as llama:
            prints.add(llama.fingerprint)
    assert len(prints) == 3


def test_trained_adapter_changes_greedy_output_through_the_api(made, tmp_path):
    """A LoRA fine-tune (PEFT, 60 steps on one sentence) makes the model say the trained reply; edgelm with the
    converted adapter says what PEFT's model says, and the base model does not."""
    model = peft_model(init_lora_weights=True, r=8, lora_alpha=16, target_modules=ALL).train()
    with LlamaModel(made["base"]) as llama:
        prompt = llama.tokenize(TRAIN_PROMPT)
        ids = prompt + llama.tokenize(TRAIN_REPLY, add_special=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x = torch.tensor([ids])
    for _ in range(60):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(tmp_path / "trained")
    adapter = convert_lora(tmp_path / "trained", TINY, tmp_path / "trained.gguf").path
    n = len(ids) - len(prompt)
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    assert want == ids[len(prompt):]  # the fine-tune learned its reply
    with edgelm.load(made["base"], n_ctx=128, n_threads=2, lora=adapter) as m:
        tuned = m.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
    with edgelm.load(made["base"], n_ctx=128, n_threads=2) as m:
        plain = m.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
    assert list(tuned.tokens) == want
    assert tuned.text == TRAIN_REPLY
    assert plain.text != TRAIN_REPLY


def edgelm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_cli_convert_and_run_with_lora(made, tmp_path):
    out = tmp_path / "cli.gguf"
    r = edgelm_cli("convert", str(made["plain"]["dir"]), "--base", str(TINY), "-o", str(out), "--outtype", "f32")
    assert r.returncode == 0, r.stderr
    assert "lora, rank 4, alpha 16, 28 weights adapted" in edgelm_cli("info", str(out)).stdout
    base = str(made["base"])
    args = ("run", base, "-p", TEXT, "-n", "12", "--temp", "0", "--threads", "2", "--json")
    with edgelm.load(base, n_ctx=2048, n_threads=2, lora=out) as m:
        want = m.generate(TEXT, max_tokens=12, temperature=0).text
    for flags in (("--lora", str(out)), ("--lora-scaled", str(out), "1")):
        r = edgelm_cli(*args, *flags)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["text"] == want
    r = edgelm_cli(*args, "--lora-scaled", str(out), "x")
    assert r.returncode == 2 and "scale must be a number" in r.stderr and "Traceback" not in r.stderr
    r = edgelm_cli("convert", str(made["plain"]["dir"]), "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and "--base" in r.stderr


# ---------------------------------------------------------------------------- bad adapters: clear errors


def test_adapter_for_another_model_is_refused_before_llama_cpp(made, rand):
    with pytest.raises(GGUFError, match="another base model"):
        LlamaModel(rand["model"], lora=made["plain"]["gguf"])
    with pytest.raises(ConversionError, match="another base model"):
        convert_lora(made["plain"]["dir"], rand["model"].parent / "ckpt", rand["model"].parent / "x.gguf")


@pytest.mark.parametrize("lora, error, match", [
    ("missing.gguf", ModelNotFoundError, "no such LoRA adapter"),
    ((None, 1.0), UsageError, "paths or"),
    (("x.gguf", float("nan")), UsageError, "finite"),
])
def test_bad_lora_arguments(made, lora, error, match):
    with pytest.raises(error, match=match):
        LlamaModel(made["base"], lora=lora)


def test_a_model_or_a_broken_file_is_not_an_adapter(made, tmp_path):
    with pytest.raises(GGUFError, match="not a LoRA adapter but a model"):
        LlamaModel(made["base"], lora=made["base"])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(made["plain"]["gguf"].read_bytes()[:5000])
    with pytest.raises(GGUFError):
        LlamaModel(made["base"], lora=cut)
    with pytest.raises(UsageError, match="twice"):
        LlamaModel(made["base"], lora=[made["plain"]["gguf"], (made["plain"]["gguf"], 0.5)])


def test_early_exit_refuses_lora(made):
    with pytest.raises(UsageError, match="early-exit"):
        edgelm.load(None, early_exit=True, lora=made["plain"]["gguf"])


@pytest.mark.parametrize("change, match", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "only LoRA"),
    ({"r": 0}, "positive"),
])
def test_unsupported_peft_adapters(made, tmp_path, change, match):
    d = tmp_path / "adapter"
    shutil.copytree(made["plain"]["dir"], d)
    config = json.loads((d / "adapter_config.json").read_text()) | change
    (d / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=match):
        convert_lora(d, TINY, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_server_applies_the_adapter(made):
    from test_server import ServerProcess

    gguf = str(made["plain"]["gguf"])
    server = ServerProcess(str(made["base"]), "--parallel", "2", "--ctx", "512", "--lora-scaled", gguf, "0.5")
    try:
        body = {"prompt": TEXT, "max_tokens": 12, "temperature": 0}
        got = httpx_post(server.base + "/v1/completions", body)["choices"][0]["text"]
        assert httpx.get(server.base + "/lora-adapters").json() == [{"id": 0, "path": gguf, "scale": 0.5}]
    finally:
        assert "Traceback" not in server.stop()
    with edgelm.load(made["base"], n_ctx=512, n_threads=2, lora=(gguf, 0.5)) as m:
        assert got == m.generate(TEXT, max_tokens=12, temperature=0).text
    with edgelm.load(made["base"], n_ctx=512, n_threads=2) as m:
        assert got != m.generate(TEXT, max_tokens=12, temperature=0).text


def httpx_post(url: str, body) -> dict | list:
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_per_request_scales_in_the_server(made):
    """llama-server's per-request `lora`: each request decodes with its own scales (an adapter left out at 0),
    alone or beside requests with other scales, and never reuses KV computed under other scales."""
    from concurrent.futures import ThreadPoolExecutor

    from test_server import ServerProcess

    plain, patterns = str(made["plain"]["gguf"]), str(made["patterns"]["gguf"])
    loads = {"default": [(plain, 0.5), (patterns, 1.0)], "none": None, "plain": [(plain, 1.0)]}
    scales = {"default": None, "none": [{"id": 0, "scale": 0}], "plain": [{"id": 0, "scale": 1.0}]}
    want = {}
    for name, lora in loads.items():
        with edgelm.load(made["base"], n_ctx=512, n_threads=2, lora=lora) as m:
            want[name] = m.generate(TEXT, max_tokens=12, temperature=0, ignore_eos=True).text
    assert len(set(want.values())) == 3  # the three settings say different things
    server = ServerProcess(str(made["base"]), "--parallel", "2", "--ctx", "512", "--lora-scaled", plain, "0.5",
                           "--lora-scaled", patterns, "1")

    def complete(name: str, route: str = "/completion") -> str:
        body = {"prompt": TEXT, "n_predict": 12, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        if route == "/v1/completions":
            del body["n_predict"]
        if scales[name] is not None:
            body["lora"] = scales[name]
        out = httpx_post(server.base + route, body)
        return out["content"] if route == "/completion" else out["choices"][0]["text"]

    try:
        for name in ("default", "none", "plain", "default", "plain"):  # the same prompt under other scales in turn
            assert complete(name) == want[name], name
        assert complete("plain", "/v1/completions") == want["plain"]
        order = ["none", "plain", "default", "none", "plain", "default"]  # two slots, three settings at once
        switches = server.metrics()["edgelm_lora_switches_total"]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(complete, order))
        assert got == [want[name] for name in order]
        assert server.metrics()["edgelm_lora_switches_total"] - switches >= 2  # the three settings took turns
        scales["same"] = [{"id": 1, "scale": 1.0}, {"id": 0, "scale": 0.5}]  # the server's own scales
        scales["empty"] = []  # as llama-server: the server's scales
        assert complete("same") == complete("empty") == want["default"]
        for bad in ([{"id": 2, "scale": 1}], "x", [{"id": 0, "scale": "big"}], [{"id": 0, "weight": 1}]):
            r = httpx.post(server.base + "/completion", json={"prompt": TEXT, "lora": bad}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text
            assert httpx.post(server.base + "/lora-adapters", json=bad).status_code == 400
        # POST /lora-adapters: the scales of requests that give none, until changed again
        listing = httpx_post(server.base + "/lora-adapters", [{"id": 0, "scale": 1.0}])
        assert [(a["id"], a["scale"]) for a in listing] == [(0, 1.0), (1, 0.0)]
        assert httpx.get(server.base + "/lora-adapters").json() == listing
        assert complete("default") == want["plain"] and complete("none") == want["none"]
        httpx_post(server.base + "/lora-adapters", [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 1}])
        assert complete("default") == want["default"]
    finally:
        assert "Traceback" not in server.stop()


def test_scales_take_turns_in_the_engine(made):
    """A long request at the model's scales does not hold the context from a short one at other scales: the sets
    of scales take turns (engine.TURN_STEPS), and each reply is its scales' own."""
    from edgelm.engine import Engine, EngineOptions
    from edgelm.engine_reuse import TURN_STEPS
    from edgelm.runtime.sampling import SamplingParams

    gguf = str(made["plain"]["gguf"])
    with edgelm.load(made["base"], n_ctx=1200, n_threads=2) as m:
        base = m.generate(TEXT, max_tokens=4, temperature=0).tokens
    with LlamaModel(made["base"], lora=[(gguf, 1.0)]) as llama, \
            Engine(llama, EngineOptions(n_parallel=2, n_ctx=1200, n_threads=2)) as engine:
        tokens = llama.tokenize(TEXT)
        long = engine.submit(tokens, SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
        short = engine.submit(tokens, SamplingParams(max_tokens=4, temperature=0), adapters=(0.0,))
        assert short.result().tokens == base
        assert not long.finished and 1000 > 2 * TURN_STEPS  # the short one did not wait for the long one's end
        assert len(long.result().tokens) == 1000 and engine.stats["lora_switches"] >= 2
        with pytest.raises(UsageError, match="1 finite numbers"):
            engine.submit(tokens, SamplingParams(max_tokens=1), adapters=(1.0, 2.0))
