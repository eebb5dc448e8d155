"""Control vectors (edgelm/runtime/control.py): applied by llama.cpp exactly as adding the direction to a layer's
output in transformers, and made from prompt pairs exactly as the hidden states transformers computes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.errors import GGUFError, UsageError
from edgelm.runtime.context import Context, ContextOptions
from edgelm.runtime.control import make_control_vector, write_control_vector
from edgelm.runtime.model import LlamaModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny"
TEXT = "Once upon a time there was a little girl who loved"
N_LAYER, N_EMBD = 4, 128


def llama_logits(path, tokens, **kw) -> np.ndarray:
    with LlamaModel(path, **kw) as llama:
        ctx = Context(llama, ContextOptions(n_ctx=128, n_threads=2, type_k="f32", type_v="f32", flash_attn=False))
        ctx.decode(tokens, 0, logits_from=0)
        out = ctx.all_logits(len(tokens))
        ctx.close()
    return out


def hf_logits(tokens, directions: dict[int, np.ndarray]) -> np.ndarray:
    """transformers' forward pass with directions[il] added to the output of decoder layer il."""
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()

    def hook(il):
        def add(_module, _inputs, output):
            if isinstance(output, tuple):
                return (output[0] + torch.from_numpy(directions[il]), *output[1:])
            return output + torch.from_numpy(directions[il])
        return add

    for il in directions:
        model.model.layers[il].register_forward_hook(hook(il))
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, tiny_gguf):
    d = tmp_path_factory.mktemp("cvec")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((N_LAYER - 1, N_EMBD)).astype(np.float32) * 0.5
    b = rng.standard_normal((N_LAYER - 1, N_EMBD)).astype(np.float32) * 0.5
    with LlamaModel(tiny_gguf["f32"]) as llama:
        tokens = llama.tokenize(TEXT)
    return {"a": (a, write_control_vector(d / "a.gguf", a)), "b": (b, write_control_vector(d / "b.gguf", b)),
            "tokens": tokens, "base": tiny_gguf["f32"], "dir": d}


def test_a_control_vector_adds_its_directions_to_the_layers_outputs(vectors):
    (a, a_path), (b, b_path), tokens, base = vectors["a"], vectors["b"], vectors["tokens"], vectors["base"]
    plain = llama_logits(base, tokens)
    steered = llama_logits(base, tokens, control=[a_path, (b_path, -0.5)])
    want = hf_logits(tokens, {il: a[il - 1] - 0.5 * b[il - 1] for il in range(1, N_LAYER)})
    assert np.abs(steered - want).max() < 1e-3
    assert np.abs(steered - plain).max() > 0.1  # it steers
    # a layer range: layers 2..2 only
    ranged = llama_logits(base, tokens, control=a_path, control_range=(2, 2))
    assert np.abs(ranged - hf_logits(tokens, {2: a[1]})).max() < 1e-3
    assert np.array_equal(llama_logits(base, tokens, control=(a_path, 0.0)), plain)


def test_make_control_vector_matches_transformers_hidden_states(vectors):
    positive = ["I love this, it is wonderful", "What a happy day"]
    negative = ["I hate this, it is awful", "What a sad day"]
    got = make_control_vector(vectors["base"], positive, negative, n_threads=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    with LlamaModel(vectors["base"]) as llama:
        ids = [llama.tokenize(p) for p in (*positive, *negative)]
    with torch.no_grad():  # hidden_states[il + 1] is the output of layer il; the last one is after the final norm
        last = [np.stack([h[0, -1].numpy() for h in model(torch.tensor([t]), output_hidden_states=True)
                          .hidden_states[1:]]) for t in ids]
    last = np.stack(last)
    want = (last[:2] - last[2:]).mean(axis=0)[1:N_LAYER - 1]
    assert got.shape == (N_LAYER - 1, N_EMBD)
    assert np.abs(got[:N_LAYER - 2] - want).max() < 1e-3 * max(1.0, np.abs(want).max())
    pca = make_control_vector(vectors["base"], positive, negative, method="pca", n_threads=2)
    assert pca.shape == got.shape and (np.einsum("ij,ij->i", pca, got) > 0).all()  # the same side as the mean


def test_cli_make_and_use(vectors, tmp_path):
    (tmp_path / "pos.txt").write_text("I love this\nWhat a happy day\n")
    (tmp_path / "neg.txt").write_text("I hate this\nWhat a sad day\n")
    out = tmp_path / "happy.gguf"
    r = subprocess.run([sys.executable, "-m", "edgelm", "cvector", str(vectors["base"]), "--positive",
                        str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt"), "-o", str(out),
                        "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    args = [sys.executable, "-m", "edgelm", "run", str(vectors["base"]), "-p", TEXT, "-n", "8", "--temp", "0",
            "--json", "--threads", "2", "--control-vector-scaled", str(out), "4"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with edgelm.load(vectors["base"], n_threads=2, control=(out, 4.0)) as m:
        assert json.loads(r.stdout)["text"] == m.generate(TEXT, max_tokens=8, temperature=0).text


def test_bad_control_vectors(vectors, tiny_gguf, tmp_path):
    base = vectors["base"]
    with pytest.raises(GGUFError, match="not a control vector"):
        LlamaModel(base, control=tiny_gguf["f32"])  # a model
    wide = write_control_vector(tmp_path / "wide.gguf", np.zeros((3, 64), np.float32))
    with pytest.raises(GGUFError, match=r"needs f32 \[128\]"):
        LlamaModel(base, control=wide)
    deep = write_control_vector(tmp_path / "deep.gguf", np.zeros((6, N_EMBD), np.float32))
    with pytest.raises(GGUFError, match="steers layers 1..3"):
        LlamaModel(base, control=deep)
    with pytest.raises(UsageError, match="layer range"):
        LlamaModel(base, control=vectors["a"][1], control_range=(0, 2))
    with pytest.raises(UsageError, match="finite"):
        LlamaModel(base, control=(vectors["a"][1], float("inf")))
    with pytest.raises(UsageError, match="in pairs"):
        make_control_vector(base, ["a"], [])


def test_server_steers_every_request(vectors):
    import httpx
    from test_server import ServerProcess

    path = str(vectors["a"][1])
    s = ServerProcess(str(vectors["base"]), "--ctx", "512", "--control-vector-scaled", path, "2",
                      "--control-vector-layer-range", "1", "2")
    try:
        r = httpx.post(s.base + "/v1/completions", json={"prompt": TEXT, "max_tokens": 8, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
    finally:
        assert "Traceback" not in s.stop()
    with edgelm.load(vectors["base"], n_ctx=512, n_threads=2, control=(path, 2.0), control_range=(1, 2)) as m:
        assert r.json()["choices"][0]["text"] == m.generate(TEXT, max_tokens=8, temperature=0).text
    with edgelm.load(vectors["base"], n_ctx=512, n_threads=2) as m:
        assert r.json()["choices"][0]["text"] != m.generate(TEXT, max_tokens=8, temperature=0).text
