"""Grammar-constrained output: GBNF checked in Python, llama.cpp's grammar sampler, and a UTF-8 guard.

llama.cpp parses GBNF itself and returns NULL on most errors, but some inputs take the whole process down:
`"a"{2,1}` and left recursion through a rule that can match nothing (`root ::= x root "b"`, `x ::= "a"?`)
grow until memory runs out, deep nesting or very long rule chains overflow the C stack, and token references
can make it throw through the C API. So every grammar passes `check_gbnf` first, which also gives errors a
line and column; what is left for llama.cpp to refuse, it refuses cleanly.
"""
from __future__ import annotations

import ctypes
import math
import string
import weakref
from dataclasses import dataclass, field

import llama_cpp as lib
import numpy as np

from edgelm.errors import UsageError

MAX_REPEAT = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD: a larger {m} is its own (clean) error
MAX_DEPTH = 128  # ( ) nesting; llama.cpp's parser recurses per level (crashed near 20,000) and so do we
MAX_RULES = 4096  # rules + groups; its left-recursion check recurses per rule and crashed at 100,000
MAX_CHARS = 1 << 20

_WORD = frozenset(string.ascii_letters + string.digits + "-")
_DIGITS = frozenset(string.digits)
_HEX = frozenset(string.hexdigits)
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_ESCAPES = frozenset('tnr\\"[]-')


# ---------------------------------------------------------------- GBNF checker

def check_gbnf(text: str) -> None:
    """Raise UsageError (naming `grammar`, with a line and column) unless `text` is GBNF llama.cpp can take."""
    if not isinstance(text, str):
        raise UsageError(f"grammar must be GBNF text, not {type(text).__name__}")
    if not text.strip():
        raise UsageError("grammar is empty: it needs at least a `root ::= ...` rule")
    if len(text) > MAX_CHARS:
        raise UsageError(f"grammar is {len(text)} characters long; at most {MAX_CHARS}")
    if "\0" in text:  # C strings end there: llama.cpp would silently parse a prefix
        raise UsageError("grammar contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UsageError(f"grammar is not encodable as UTF-8: {err.reason}") from None
    _Checker(text).run()


@dataclass
class _Item:
    kind: str  # "term" (one or more characters), "empty" (""), "ref" (a rule) or "group" (a ( ) node)
    at: int  # offset in the text, for messages
    target: object = None  # the rule name or group key of a ref or group
    reps: list = field(default_factory=list)  # (lo, hi) per repetition operator; hi None: unbounded


_OPS = {"*": (0, None), "+": (1, None), "?": (0, 1)}


class _Checker:
    """A recursive-descent pass over GBNF as llama.cpp reads it, keeping just enough structure to find
    left recursion: llama.cpp spots it only through rules with a literally empty alternative, and through a
    rule that merely can match nothing (`x ::= "a"?`) builds parse stacks until memory runs out."""

    def __init__(self, text: str):
        self.s, self.i = text, 0
        self.nodes: dict = {}  # rule name or ("(", n) -> alternatives, each a list of _Item
        self.owner: dict = {}  # group key -> the rule it sits in
        self.refs: dict[str, int] = {}  # rule name -> first use
        self.rule_name = ""

    def run(self) -> None:
        self.space(True)
        while self.i < len(self.s):
            self.rule()
        for name, at in self.refs.items():
            if name not in self.nodes:
                self.fail(f"undefined rule '{name}'", at)
        if "root" not in self.nodes:
            raise UsageError("grammar has no 'root' rule (generation starts there)")
        if len(self.nodes) > MAX_RULES:
            raise UsageError(f"grammar has {len(self.nodes)} rules and groups; at most {MAX_RULES}")
        self.left_recursion()

    def fail(self, message: str, at: int | None = None) -> None:
        at = self.i if at is None else at
        line = self.s.count("\n", 0, at) + 1
        column = at - (self.s.rfind("\n", 0, at) + 1) + 1
        raise UsageError(f"grammar: line {line}, column {column}: {message}")

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def space(self, newlines: bool) -> None:
        """Blanks and # comments; line ends only where a rule may continue (after ::=, |, inside ( ))."""
        while True:
            c = self.peek()
            if c in (" ", "\t") or (newlines and c in ("\r", "\n")):
                self.i += 1
            elif c == "#":
                while self.peek() not in ("", "\r", "\n"):
                    self.i += 1
            else:
                return

    def name(self) -> str:
        start = self.i
        while self.peek() in _WORD:
            self.i += 1
        if self.i == start:
            self.fail(f"expected a rule name, found {self.peek()!r}")
        return self.s[start:self.i]

    def rule(self) -> None:
        self.rule_name = name = self.name()
        self.space(False)
        if not self.s.startswith("::=", self.i):
            self.fail(f"expected '::=' after the rule name '{name}'")
        self.i += 3
        self.space(True)
        alternatives = self.alternates(0, nested=False)
        c = self.peek()
        if c == "\r":
            self.i += 2 if self.peek(1) == "\n" else 1
        elif c == "\n":
            self.i += 1
        elif c:
            self.fail(f"unexpected {c!r}" + (" (unbalanced ')'?)" if c == ")" else ""))
        self.space(True)
        self.nodes[name] = alternatives  # as in llama.cpp, a later definition replaces an earlier one

    def alternates(self, depth: int, nested: bool) -> list[list[_Item]]:
        alternatives = [self.sequence(depth, nested)]
        while self.peek() == "|":
            self.i += 1
            self.space(True)
            alternatives.append(self.sequence(depth, nested))
        return alternatives

    def sequence(self, depth: int, nested: bool) -> list[_Item]:
        items: list[_Item] = []
        while True:
            c, at = self.peek(), self.i
            if c == '"':
                items.append(_Item("term" if self.literal() else "empty", at))
            elif c == "[":
                self.char_class()
                items.append(_Item("term", at))
            elif c in ("<", "!"):
                self.token()
            elif c and c in _WORD:
                name = self.name()
                self.refs.setdefault(name, at)
                items.append(_Item("ref", at, name))
            elif c == "(":
                if depth >= MAX_DEPTH:
                    self.fail(f"groups nested more than {MAX_DEPTH} deep")
                key = ("(", len(self.owner))
                self.owner[key] = self.rule_name
                self.i += 1
                self.space(True)
                self.nodes[key] = self.alternates(depth + 1, nested=True)
                if self.peek() != ")":
                    self.fail("unclosed '('", at)
                self.i += 1
                items.append(_Item("group", at, key))
            elif c == ".":
                self.i += 1
                items.append(_Item("term", at))
            elif c in ("*", "+", "?", "{"):
                if not items or items[-1].kind == "empty":
                    self.fail(f"'{c}' must follow an item")
                if c == "{":
                    items[-1].reps.append(self.repetition(nested))
                else:
                    items[-1].reps.append(_OPS[c])
                    self.i += 1
            else:
                return items
            self.space(nested)

    def left_recursion(self) -> None:
        """Fail if a rule can begin with itself, directly or through items that can match nothing."""
        nullable = dict.fromkeys(self.nodes, False)

        def empty_ok(item: _Item) -> bool:  # before its repetition operators
            return item.kind == "empty" or (item.kind != "term" and nullable[item.target])

        def can_skip(item: _Item) -> bool:
            return empty_ok(item) or any(lo == 0 for lo, _ in item.reps)

        users: dict = {key: set() for key in self.nodes}  # node -> the nodes that refer to it
        for key, alternatives in self.nodes.items():
            for item in (item for seq in alternatives for item in seq):
                if item.kind in ("ref", "group"):
                    users[item.target].add(key)
        todo = list(self.nodes)
        while todo:  # least fixpoint; a node is looked at again only when something it uses turns nullable
            key = todo.pop()
            if not nullable[key] and any(all(map(can_skip, seq)) for seq in self.nodes[key]):
                nullable[key] = True
                todo.extend(users[key])
        first: dict = {key: [] for key in self.nodes}  # key -> rules and groups it can begin with
        for key, alternatives in self.nodes.items():
            for item in (item for seq in alternatives for item in seq):
                # llama.cpp expands x* to x' ::= x x' | ...: left-recursive when x can match nothing
                empty = empty_ok(item)
                for lo, hi in item.reps:
                    if hi is None and empty:
                        self.fail("*, + or {m,} over something that can match nothing is left recursion once "
                                  "llama.cpp expands it; make the repeated item non-empty", item.at)
                    empty = empty or lo == 0
            for seq in alternatives:
                for item in seq:
                    if item.kind in ("ref", "group") and all(hi != 0 for _, hi in item.reps):
                        first[key].append(item.target)
                    if not can_skip(item):
                        break
        state = dict.fromkeys(self.nodes, 0)  # 0 new, 1 on the path, 2 done; iterative: no recursion limit
        for start in self.nodes:
            if state[start]:
                continue
            state[start], path = 1, [(start, iter(first[start]))]
            while path:
                key, todo = path[-1]
                nxt = next(todo, None)
                if nxt is None:
                    state[key] = 2
                    path.pop()
                elif state[nxt] == 1:
                    name = nxt if isinstance(nxt, str) else self.owner[nxt]
                    raise UsageError(f"grammar: left recursion: rule '{name}' can begin with itself (possibly "
                                     f"through items that can match nothing); llama.cpp cannot run it")
                elif state[nxt] == 0:
                    state[nxt] = 1
                    path.append((nxt, iter(first[nxt])))

    def literal(self) -> bool:
        """A "..." string; False when it is empty (nothing to repeat)."""
        start, n = self.i, 0
        self.i += 1
        while self.peek() != '"':
            if not self.peek():
                self.fail("unterminated string", start)
            self.char(start)
            n += 1
        self.i += 1
        return n > 0

    def char_class(self) -> None:
        start = self.i
        self.i += 1 + (self.peek(1) == "^")
        while self.peek() != "]":
            if not self.peek():
                self.fail("unterminated character class '['", start)
            self.char(start)
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                self.char(start)
        self.i += 1

    def char(self, start: int) -> None:
        if self.peek() != "\\":
            self.i += 1
            return
        e = self.peek(1)
        if e in _HEX_ESCAPES:
            n = _HEX_ESCAPES[e]
            digits = self.s[self.i + 2:self.i + 2 + n]
            if len(digits) < n or not set(digits) <= _HEX:
                self.fail(f"'\\{e}' needs {n} hex digits")
            self.i += 2 + n
        elif e in _ESCAPES:
            self.i += 2
        elif not e:
            self.fail("unterminated escape", start)
        else:
            self.fail(f"unknown escape '\\{e}'")

    def token(self) -> None:
        # llama.cpp 0.3.36 masks a token like "at" as allowed for `[a] !<[7]>` but throws when accepting it,
        # which aborts the process; until that is fixed token references are refused
        self.fail("token references (<[id]>, !<[id]>, <text>) are not supported; use logit_bias for tokens")

    def repetition(self, nested: bool) -> tuple[int, int | None]:
        self.i += 1
        self.space(nested)
        lo = self.integer()
        self.space(nested)
        hi: int | None = lo
        if self.peek() == ",":
            self.i += 1
            self.space(nested)
            hi = self.integer() if self.peek() in _DIGITS else None
            self.space(nested)
        if self.peek() != "}":
            self.fail("expected '}' closing a repetition {m}, {m,} or {m,n}")
        self.i += 1
        if lo > MAX_REPEAT:
            self.fail(f"{lo} repetitions: llama.cpp allows at most {MAX_REPEAT}")
        if hi is not None and hi < lo:  # llama.cpp would loop until memory runs out
            self.fail(f"repetition {{{lo},{hi}}}: the maximum is below the minimum")
        return lo, hi if hi is None or hi <= MAX_REPEAT else None  # llama.cpp: a larger max is no max

    def integer(self) -> int:
        start = self.i
        while self.peek() and self.peek() in _DIGITS:
            self.i += 1
        if self.i == start:
            self.fail("expected a number")
        return int(self.s[start:self.i])


# ---------------------------------------------------------------- llama.cpp's grammar sampler

class Grammar:
    """llama.cpp's grammar sampler: masks the tokens the grammar cannot take next, and follows accepted ones."""

    def __init__(self, text: str, vocab):
        check_gbnf(text)
        self._ptr = lib.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not self._ptr:  # what check_gbnf leaves to llama.cpp
            raise UsageError(f"grammar rejected by llama.cpp: nested repetitions expand to more than {MAX_REPEAT} "
                             "rules (or another limit of its parser)")
        self._one = lib.llama_token_data(0, 0.0, 0.0)  # a one-candidate array for allows()
        self._one_array = lib.llama_token_data_array(ctypes.pointer(self._one), 1, -1, False)

    def apply(self, candidates) -> None:
        """Set the logit of every candidate the grammar rejects to -inf (`candidates`: a byref(token data array))."""
        lib.llama_sampler_apply(self._ptr, candidates)

    def allows(self, token: int) -> bool:
        """Whether `token` may come next: llama.cpp's cheap check before masking the whole vocabulary."""
        self._one.id, self._one.logit = token, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        lib.llama_sampler_apply(self._ptr, ctypes.byref(self._one_array))
        return not math.isinf(self._one.logit)

    def accept(self, token: int) -> None:
        # llama.cpp throws (and so aborts) on a token the grammar rejects: callers check allows() first
        lib.llama_sampler_accept(self._ptr, token)

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            lib.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self):
        self.close()


# ---------------------------------------------------------------- UTF-8 guard

# lead byte -> (continuation bytes due, range of the first one); C0, C1 and F5-FF never occur in UTF-8
_LEADS = {**{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}, 0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F),
          **{b: (2, 0x80, 0xBF) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)}, 0xF0: (3, 0x90, 0xBF),
          **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}, 0xF4: (3, 0x80, 0x8F)}
_COMPLETE = (0, 0x80, 0xBF)


def _utf8_step(state: tuple, data: bytes) -> tuple | None:
    """The decoder state after `data`, or None if it makes the bytes invalid UTF-8."""
    due, lo, hi = state
    for b in data:
        if due:
            if not lo <= b <= hi:
                return None
            due, lo, hi = due - 1, 0x80, 0xBF
        elif b >= 0x80:
            if b not in _LEADS:
                return None
            due, lo, hi = _LEADS[b]
    return due, lo, hi


class Utf8Guard:
    """Bans the tokens that would make constrained output invalid UTF-8.

    llama.cpp's grammar decodes any lead byte, so byte-level tokens can spell surrogates, overlong forms or
    code points past U+10FFFF that a JSON parser rejects. Masks are cached per (model, decoder state).
    """

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (pieces, {state: mask})

    def __init__(self, model):
        if model not in self._cache:
            self._cache[model] = ([model.token_bytes(t) for t in range(model.n_vocab)], {})
        self.pieces, self.masks = self._cache[model]
        self.state = _COMPLETE

    def allowed(self) -> np.ndarray:
        """A bool per token id: may it come next? Mid-character, tokens without bytes (EOG) may not."""
        mask = self.masks.get(self.state)
        if mask is None:
            mask = np.array([_utf8_step(self.state, p) is not None and (bool(p) or self.state == _COMPLETE)
                             for p in self.pieces], dtype=bool)
            self.masks[self.state] = mask
        return mask

    def accept(self, token: int) -> None:
        self.state = _utf8_step(self.state, self.pieces[token]) or _COMPLETE
