"""The interactive chat's session (edgelm/repl.py): a conversation longer than the context goes on."""
from __future__ import annotations

import io

import edgelm
from edgelm.repl import ChatSession, repl

LONG = "Tell me about the history of the number " + " ".join(str(i) for i in range(60)) + "."


def test_a_long_conversation_drops_its_oldest_turns_and_keeps_the_system_message(tiny_gguf):
    with edgelm.load(tiny_gguf["q8_0"], n_ctx=256, n_threads=2) as m:
        session = ChatSession(m, "Be brief.", temperature=0, max_tokens=24, ignore_eos=True)
        notes = []
        for turn in range(6):
            last = session.reply(f"{turn}: {LONG}", lambda text: None, note=notes.append)
            assert last is not None and last.finish_reason == "length"  # each turn got its whole reply
            assert session.n_tokens(session.messages) + 24 <= 256
        assert session.messages[0] == {"role": "system", "content": "Be brief."}
        assert session.messages[1]["role"] == "user" and session.messages[-1]["role"] == "assistant"
        assert session.messages[-2]["content"].startswith("5: ")  # the newest turn stays
        assert notes and "oldest message" in notes[0] and "256-token context" in notes[0]
        kept = len(session.messages)
        assert kept < 1 + 2 * 6


def test_a_message_longer_than_the_context_is_an_error_for_that_turn_only(tiny_gguf):
    with edgelm.load(tiny_gguf["q8_0"], n_ctx=128, n_threads=2) as m:
        session = ChatSession(m, None, temperature=0, max_tokens=4)
        out, err = io.StringIO(), io.StringIO()
        assert repl(session, io.StringIO(f"hello\n{LONG * 4}\nhi again\n"), out, err) == 0
        assert "does not fit the context" in err.getvalue()
        assert [msg["content"] for msg in session.messages if msg["role"] == "user"] == ["hello", "hi again"]
