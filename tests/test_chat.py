"""Chat templates: validation, the sandbox, parity with transformers, and chat() on the bundled model."""
from __future__ import annotations

import copy
import warnings
from datetime import datetime
from pathlib import Path

import pytest

import edgelm
from edgelm.errors import ChatTemplateError, TemplateSecurityError, UsageError
from edgelm.runtime import chat
from edgelm.runtime.chat import CHATML, ChatTemplate, template_for
from edgelm.runtime.sampling import SamplerChain

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / ".cache" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "models" / "templates"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # the texts of our tokenizer's BOS / EOS

USER = [{"role": "user", "content": "Hello"}]
CONVERSATIONS = [
    USER,
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi ü ☃"},
     {"role": "assistant", "content": "Hey."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "  spaced \n"}, {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def small():
    with edgelm.load(n_ctx=256, n_threads=2) as m:  # the bundled model: ChatML template, base code model
        yield m


# ------------------------------------------------------------ messages

@pytest.mark.parametrize("messages, match", [
    ("hello", "must be a list"),  # a bare prompt
    ({"role": "user", "content": "x"}, "must be a list"),  # one message, not a list
    ([], "empty"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"content": "x"}], r"\['role'\] must be one of"),
    ([{"role": "robot", "content": "x"}], "must be one of system, user, assistant, tool"),
    ([{"role": "user"}], r"\['content'\] must be a string"),
    ([{"role": "user", "content": None}], r"\['content'\] must be a string"),
    ([{"role": "user", "content": ["a"]}], r"only text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text parts"),
    ([{"role": "user", "content": None, "tool_calls": []}], r"\['content'\] must be a string"),  # not assistant
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}],
     r"tool_calls'\]\[0\] must be"),
    ([{"role": "assistant", "content": None, "tool_calls": "f"}], "must be a list"),
    ([{"role": "user", "content": "x", "images": []}], "unknown key"),
    ([{"role": "tool", "content": "x", "name": 3}], r"\['name'\] must be a string"),
])
def test_bad_messages_are_usage_errors(messages, match):
    with pytest.raises(UsageError, match=match):
        ChatTemplate(CHATML).render(messages)


def test_messages_are_copied_to_plain_dicts():
    class Text(str):  # a str subclass could carry methods into the template
        def evil(self):
            return "!"

    messages = [{"role": "user", "content": Text("hi")}, {"role": "tool", "content": "42", "name": "calc"}]
    out = chat.validate_messages(messages)
    assert out == messages and out[0] is not messages[0] and type(out[0]["content"]) is str


# ------------------------------------------------------------ the sandbox

SECURITY = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the classic escape to every loaded class
    "{% if ''.__class__ %}x{% endif %}",  # blocked even where jinja would only test truthiness
    "{{ cycler.__init__.__globals__ }}",  # globals of a jinja helper's module
    "{{ joiner.__init__.__globals__.os }}",
    "{{ lipsum.__globals__['os'].system('id') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",  # edgelm's own helpers are functions too
    "{{ strftime_now.__code__ }}",
    "{{ self.__init__.__globals__ }}",  # the template reference
    "{{ self._TemplateReference__context }}",  # name-mangled private attribute
    "{% for m in messages %}{{ loop.__class__ }}{% endfor %}",
    "{{ messages|attr('__class__') }}",  # the attr filter goes through the same check
    "{{ messages['__class__'] }}",  # and so does subscription
    "{{ '{0.__class__.__mro__}'.format(messages) }}",  # str.format reaching attributes
    "{{ messages.append({'role': 'system', 'content': 'x'}) }}",  # in-place changes to the inputs
    "{% set _ = messages.pop() %}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{% set _ = messages[0].clear() %}",
    "{% set ns = namespace(_hidden=1) %}",  # underscore names on a namespace
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ 'x' * 10**10 }}",  # memory exhaustion
    "{{ 2 ** 100000000 }}",  # CPU exhaustion
]


@pytest.mark.parametrize("source", SECURITY)
def test_sandbox_blocks_internals_and_mutation(source):
    messages = [{"role": "user", "content": "hi"}]
    before = copy.deepcopy(messages)
    with pytest.raises(TemplateSecurityError, match="blocked by the sandbox"):
        ChatTemplate(source).render(messages)
    assert messages == before


def test_dict_global_has_no_mutating_methods():
    # jinja's `dict` global is the type itself: dict.update(messages[0], ...) would edit the caller's message
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ dict.update(messages[0], role='system') }}").render(messages)
    assert messages == [{"role": "user", "content": "hi"}]
    assert ChatTemplate("{{ dict(a=1) }}{{ dict.fromkeys(['b'], 2) }}").render(messages) == "{'a': 1}{'b': 2}"


@pytest.mark.parametrize("source, error, match", [
    ("{% for m in messages %}", ChatTemplateError, "syntax error at line 1"),
    ("a\n{{ messages[0] | nosuchfilter }}", ChatTemplateError, "syntax error at line 2"),
    ("{{ raise_exception('System role not supported') }}", ChatTemplateError,
     "rejected the conversation: System role not supported"),
    ("{{ messages[0].content + 1 }}", ChatTemplateError, "TypeError"),
    ("{{ range(10**9) | list }}", ChatTemplateError, "OverflowError"),  # jinja's sandbox caps range()
    ("{{ nothing() }}", ChatTemplateError, "'nothing' is undefined"),
])
def test_template_errors_are_edgelm_errors(source, error, match):
    with pytest.raises(error, match=match):
        ChatTemplate(source).render(USER)


def test_hf_template_features():
    render = lambda src: ChatTemplate(src, bos_token=BOS, eos_token=EOS).render(USER, add_generation_prompt=False)
    assert render("{{ {'a': 'ü<>'} | tojson }}") == '{"a": "ü<>"}'  # no ASCII or HTML escaping
    assert render("{{ [1] | tojson(indent=2) }}") == "[\n  1\n]"
    assert render("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "012"
    assert render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                  "{{ ns.n }}") == "1"
    variables = "{{ bos_token }}|{{ eos_token }}|{{ tools }}|{{ add_generation_prompt }}"
    assert render(variables) == f"{BOS}|{EOS}|None|False"
    assert render("{{ strftime_now('%Y') }}") == str(datetime.now().year)
    assert render("{% generation %}kept{% endgeneration %}") == "kept"  # transformers' training-mask tag
    assert render("  {% if true %}\nx{% endif %}\n") == "x"  # trim_blocks + lstrip_blocks


# ------------------------------------------------------------ parity with transformers

PARITY = [
    "meta-llama-Llama-3.1-8B-Instruct",  # bos_token, strftime_now, system defaults
    "meta-llama-Llama-3.2-3B-Instruct",
    "Qwen-Qwen2.5-7B-Instruct",  # ChatML with a default system prompt
    "Qwen-Qwen3-0.6B",  # namespace, reversed loops, thinking tags
    "mistralai-Mistral-Nemo-Instruct-2407",  # [INST] with raise_exception on role order
    "Mistral-Small-3.2-24B-Instruct-2506",
    "microsoft-Phi-3.5-mini-instruct",
    "google-gemma-2-2b-it",  # rejects system messages
    "HuggingFaceTB-SmolLM3-3B",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    "ibm-granite-granite-3.3-2B-Instruct",
    "openai-gpt-oss-120b",  # harmony format, tojson
    "LFM2.5-8B-A1B",  # {% generation %} blocks
]


@pytest.fixture(scope="module")
def hf_render():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(ROOT / "models" / "tokenizer.json"))

    def render(source, messages, add_generation_prompt):
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=source,
                                                    bos_token=BOS, eos_token=EOS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return render


def _both(hf_render, source, messages, agp):
    try:
        expected = hf_render(source, messages, agp)
    except Exception as e:  # the template refuses this conversation: edgelm must refuse it too
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source, bos_token=BOS, eos_token=EOS).render(messages, add_generation_prompt=agp)
        return type(e).__name__
    assert ChatTemplate(source, bos_token=BOS, eos_token=EOS).render(messages, add_generation_prompt=agp) == expected
    return None


@pytest.mark.parametrize("name", PARITY)
def test_render_equals_transformers(hf_render, name):
    path = TEMPLATES / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"llama.cpp template missing: {path}")
    source = path.read_text()
    refused = [_both(hf_render, source, c, agp) for c in CONVERSATIONS for agp in (True, False)]
    assert refused.count(None) >= 4  # most cases render; a refusal (gemma's system role) is compared too


@pytest.mark.parametrize("name", ["chatml", "completion"])
def test_builtin_templates_equal_transformers(hf_render, name):
    for messages in CONVERSATIONS:
        for agp in (True, False):
            assert _both(hf_render, chat.BUILTIN[name], messages, agp) is None


# ------------------------------------------------------------ the model's template and its tokens

def test_bundled_model_uses_its_chatml_template(small, hf_render):
    assert small.llama.chat_template and template_for(small.llama).name == "model"
    prompt = small.chat_prompt(CONVERSATIONS[1])
    assert prompt == hf_render(small.llama.chat_template, CONVERSATIONS[1], True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert small.chat_prompt(USER, add_generation_prompt=False) == "<|im_start|>user\nHello<|im_end|>\n"


def test_prompt_tokens_parse_specials_and_keep_one_bos(small):
    llama = small.llama
    start, end = (llama.tokenize(t, add_special=False, parse_special=True) for t in ("<|im_start|>", "<|im_end|>"))
    assert len(start) == len(end) == 1 and llama.is_eog(end[0])  # ChatML's end of turn is an EOG (eot) token
    tokens = chat.chat_tokens(llama, USER, template_for(llama))
    assert tokens[0] == llama.bos and tokens[1] == start[0] and end[0] in tokens
    # a template that writes BOS itself (Llama 3 style) still gives one BOS, as llama.cpp does
    with_bos = chat.chat_tokens(llama, USER, template_for(llama, "{{ bos_token }}" + CHATML))
    assert with_bos == tokens
    assert chat.chat_tokens(llama, USER, template_for(llama, "completion")) == llama.tokenize("Hello")


class _Vocab:
    """A model without a template whose vocabulary has `specials` as single special tokens."""

    chat_template, bos, eos = None, -1, -1

    def __init__(self, specials: tuple[str, ...]):
        self.specials = specials

    def tokenize(self, text, add_special=True, parse_special=False):
        return [1] if parse_special and text in self.specials else list(text.encode())

    def special_text(self, token):
        return ""


@pytest.mark.parametrize("specials, expected", [
    (("<|im_start|>", "<|im_end|>"), "chatml"),
    (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "llama3"),
    (("<start_of_turn>", "<end_of_turn>"), "gemma"),
    (("<|user|>", "<|assistant|>", "<|end|>", "<|system|>"), "phi3"),
    (("<|im_start|>",), "completion"),  # half a layout's markers name none
    ((), "completion"),
])
def test_fallback_without_a_template(specials, expected):
    assert template_for(_Vocab(specials)).name == expected


# ------------------------------------------------------------ llama.cpp's built-in templates

@pytest.mark.parametrize("name, model_template, conversations", [
    ("phi3", "microsoft-Phi-3.5-mini-instruct", CONVERSATIONS[:2]),
    ("gemma", "google-gemma-2-2b-it", [USER, CONVERSATIONS[1][1:]]),  # gemma's own refuses a system message
])
def test_llama_cpp_builtin_templates_equal_the_models_own(hf_render, name, model_template, conversations):
    """A built-in name renders as the model family's own Jinja template does under transformers."""
    path = TEMPLATES / f"{model_template}.jinja"
    if not path.is_file():
        pytest.skip(f"llama.cpp template missing: {path}")
    builtin = ChatTemplate("", bos_token=BOS, eos_token=EOS, name=name)
    for messages in conversations:
        expected = hf_render(path.read_text(), messages, True).removeprefix(BOS)  # the tokenizer adds BOS
        assert builtin.render(messages) == expected


def test_builtin_names_on_the_bundled_model(small):
    assert {"chatml", "completion", "llama3", "gemma", "phi3", "mistral-v7", "zephyr"} <= set(chat.builtin_names())
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert small.chat_prompt(two, chat_template="llama3") == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert small.chat_prompt(two, chat_template="gemma", add_generation_prompt=False) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n")  # Gemma has no system turn: it joins the user's
    long = [{"role": "user", "content": "ü" * 20000}]  # longer than any first guess at the text's size
    assert small.chat_prompt(long, chat_template="phi3") == "<|user|>\n" + "ü" * 20000 + "<|end|>\n<|assistant|>\n"
    out = small.chat(USER, chat_template="llama3", max_tokens=4, temperature=0)
    assert out.timings.completion_tokens == 4


def test_builtin_templates_take_tools_and_tool_calls_as_text(small):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    text = small.chat_prompt([*USER, call], chat_template="llama3", tools=tools, add_generation_prompt=False)
    assert text.startswith("<|start_header_id|>system<|end_header_id|>") and "get_time" in text.split("<|eot_id|>")[0]
    assert '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|eot_id|>' in text


def test_builtin_template_refusals(small):
    with pytest.raises(UsageError, match=r"unknown chat template name 'llama-3'; built-in: chatml, completion, .*llama3"):
        small.chat_prompt(USER, chat_template="llama-3")
    with pytest.raises(UsageError, match="NUL character"):
        small.chat_prompt([{"role": "user", "content": "a\0b"}], chat_template="llama3")
    with pytest.raises(UsageError, match="chat_template_kwargs"):
        small.chat_prompt(USER, chat_template="gemma", chat_template_kwargs={"_x": 1})


def test_chat_template_override(small):
    assert small.chat_prompt(USER, chat_template="completion") == "Hello"
    assert small.chat_prompt(USER, chat_template="[{{ messages[0].content }}]") == "[Hello]"
    with pytest.raises(ChatTemplateError, match="syntax error"):
        small.chat_prompt(USER, chat_template="{% if %}")
    with pytest.raises(UsageError, match="chat_template"):
        small.chat_prompt(USER, chat_template=3)


def test_chat_template_load_option():
    with edgelm.load(n_ctx=128, n_threads=2, chat_template="completion") as m:
        assert m.chat_prompt(USER) == "Hello"
        assert m.chat(USER, max_tokens=4, temperature=0).text == m.generate("Hello", max_tokens=4, temperature=0).text
    with pytest.raises(ChatTemplateError, match="syntax error"):
        edgelm.load(n_ctx=128, n_threads=2, chat_template="{{ broken")


# ------------------------------------------------------------ chat() and chat_stream()

def test_chat_and_stream_agree(small):
    full = small.chat(CONVERSATIONS[1], max_tokens=16, temperature=0)
    chunks = list(small.chat_stream(CONVERSATIONS[1], max_tokens=16, temperature=0))
    assert "".join(c.text for c in chunks) == full.text and chunks[-1].finish_reason == full.finish_reason
    assert full.timings.prompt_tokens == len(chat.chat_tokens(small.llama, CONVERSATIONS[1], template_for(small.llama)))
    assert "<|im_end|>" not in full.text and "<|im_start|>" not in full.text


def test_chat_stops_at_end_of_turn(small, monkeypatch):
    # the base model never learned to close a turn: make the sampler do it on the fourth token
    end = small.llama.tokenize("<|im_end|>", add_special=False, parse_special=True)[0]
    sample, calls = SamplerChain.sample, []

    def scripted(self, *args, **kwargs):
        calls.append(1)
        return end if len(calls) == 4 else sample(self, *args, **kwargs)

    monkeypatch.setattr(SamplerChain, "sample", scripted)
    out = small.chat(USER, max_tokens=32, temperature=0)
    assert out.finish_reason == "stop" and len(out.tokens) == 3 and end not in out.tokens


def test_chat_validates_before_generating(small):
    with pytest.raises(UsageError, match="role"):
        small.chat([{"role": "bot", "content": "x"}])
    with pytest.raises(UsageError, match="unknown sampling"):
        small.chat(USER, nonsense=1)
    with pytest.raises(UsageError):
        next(small.chat_stream("just a string"))


THINK_SWITCH = ("{% if enable_thinking is defined and not enable_thinking %}[no thinking]{% endif %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")


def test_chat_template_kwargs_reach_the_template(small):
    messages = [{"role": "user", "content": "hi"}]
    assert ChatTemplate(THINK_SWITCH).render(messages, extra={"enable_thinking": False}) == "[no thinking]hi"
    assert ChatTemplate(THINK_SWITCH).render(messages, extra={"enable_thinking": True}) == "hi"
    assert small.chat_prompt(messages, chat_template=THINK_SWITCH, chat_template_kwargs={"enable_thinking": False}) \
        == "[no thinking]hi"


@pytest.mark.parametrize("extra, match", [
    ({"messages": []}, "cannot be a template variable"),  # the template's own variables stay edgelm's
    ({"_secret": 1}, "cannot be a template variable"),
    ({"not a name": 1}, "cannot be a template variable"),
    ({"x": object()}, "JSON values"),
    ("enable_thinking", "must be an object"),
])
def test_bad_chat_template_kwargs(extra, match):
    with pytest.raises(UsageError, match=match):
        ChatTemplate(THINK_SWITCH).render([{"role": "user", "content": "hi"}], extra=extra)
