"""Reasoning models' <think> blocks, kept out of the reply: split as a stream, and on the bundled model."""
from __future__ import annotations

import pytest

import edgelm
from edgelm.runtime.chat import CHATML
from edgelm.runtime.reasoning import ThinkSplitter, split_reasoning


@pytest.mark.parametrize("pieces, opened, reasoning, content", [
    (["<think>\nI should add.\n</think>\n\n", "3"], False, "I should add.\n", "3"),
    (["<th", "ink>a", "b</th", "ink>", "\n", "\nc"], False, "ab", "c"),  # tags split across pieces
    (["  <think>x</think>y"], False, "x", "y"),
    (["plain answer"], False, "", "plain answer"),
    (["<b>bold</b>"], False, "", "<b>bold</b>"),  # a tag that only starts like <think>
    (["<", "/think"], False, "", "</think"),
    (["still thinking, then cut"], True, "still thinking, then cut", ""),  # the prompt opened the tag
    (["reasons</think>\n\nanswer"], True, "reasons", "answer"),
    (["<think>never closed"], False, "never closed", ""),
])
def test_think_splitter(pieces, opened, reasoning, content):
    splitter = ThinkSplitter(opened)
    parts = [splitter.feed(p) for p in pieces] + [splitter.finish()]
    assert "".join(r for r, _ in parts) == reasoning and "".join(c for _, c in parts) == content
    whole = split_reasoning("".join(pieces), opened)
    assert whole[1] == content and whole[0] == (reasoning.rstrip() if splitter.opened else None)


@pytest.fixture(scope="module")
def model():
    with edgelm.load(n_ctx=512, n_threads=2, prefix_cache_bytes=0) as m:
        yield m


THINKING = r'root ::= "<think>\n" [a-z]{2,6} " " [a-z]{2,6} "\n</think>\n\n" [a-z]{1,8}'


def test_chat_keeps_the_thinking_apart(model):
    messages = [{"role": "user", "content": "What is two plus two?"}]
    out = model.chat(messages, grammar=THINKING, temperature=0, max_tokens=48)
    raw = model.generate(model._chat_tokens(messages, {})[0], grammar=THINKING, temperature=0,
                         max_tokens=48).text
    assert raw.startswith("<think>\n") and out.reasoning is not None and out.reasoning in raw
    assert " " in out.reasoning and "<think>" not in out.text and raw.endswith(out.text) and out.text
    chunks = list(model.chat_stream(messages, grammar=THINKING, temperature=0, max_tokens=48))
    assert "".join(c.text for c in chunks) == out.text
    assert "".join(c.reasoning or "" for c in chunks).strip() == out.reasoning
    assert model.chat(messages, temperature=0, max_tokens=8).reasoning is None  # no tag, no reasoning


def test_a_template_that_opens_the_thinking(model):
    template = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    assert template != CHATML
    grammar = r'root ::= [a-z]{2,6} "\n</think>\n\n" [a-z]{1,8}'
    out = model.chat([{"role": "user", "content": "Hi"}], chat_template=template, grammar=grammar, temperature=0,
                     max_tokens=32)
    assert out.reasoning and out.text and "</think>" not in out.text


def test_the_chat_repl_shows_the_thinking_apart_and_keeps_it_out_of_the_history(model):
    from edgelm.repl import ChatSession

    session = ChatSession(model, grammar=THINKING, temperature=0, max_tokens=48)
    written = []
    last = session.reply("What is two plus two?", written.append)
    shown = "".join(written)
    thinking, answer = shown.split("\n...done thinking.\n\n")
    assert thinking.startswith("Thinking...\n") and " " in thinking and "<think>" not in shown
    assert answer and session.messages[-1] == {"role": "assistant", "content": answer}
    assert last.finish_reason in ("stop", "length")


def test_run_json_has_the_reasoning(model, tmp_path):
    import json
    import subprocess
    import sys

    grammar = tmp_path / "think.gbnf"
    grammar.write_text(THINKING)
    r = subprocess.run([sys.executable, "-m", "edgelm", "run", "-p", "Two plus two?", "--chat", "--temp", "0",
                        "-n", "48", "--grammar-file", str(grammar), "--json", "--threads", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["reasoning"] and "<think>" not in out["text"] and out["text"]
    shown = subprocess.run([sys.executable, "-m", "edgelm", "run", "-p", "Two plus two?", "--chat", "--temp", "0",
                            "-n", "48", "--grammar-file", str(grammar), "--threads", "2"],
                           capture_output=True, text=True, timeout=300).stdout
    assert shown.startswith("Thinking...\n") and shown.rstrip().endswith(out["text"])
