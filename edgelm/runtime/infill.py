"""Fill-in-the-middle prompts: the tokens that ask a model trained with FIM tokens (Qwen2.5-Coder, CodeLlama,
StarCoder, DeepSeek-Coder, Granite, ...) for what goes between a prefix and a suffix, as code editors ask it.

The layout is llama-server's /infill: the extra files (the repository-level pattern with the model's repo and
file-separator tokens where it has them, else between snippet markers), BOS, then FIM prefix, the prefix, the start
of the middle, FIM suffix, the suffix, FIM middle (suffix first with spm: suffix-prefix-middle order). Prefix and
suffix are cut to a batch, three quarters and one quarter; the extra files take the context less a batch, but never
more than leaves the FIM part and the reply room in the context (where llama-server sends the prompt past the
context and answers 400). llama.cpp finds a model's FIM tokens by the GGUF's keys or by their usual texts.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from edgelm.errors import UsageError

FIM_PROJECT, FIM_FILE = "myproject\n", "filename\n"  # llama-server's repository and current file names
SNIPPET = "\n\n--- snippet ---\n\n"  # between extra files, for a model without a file-separator token
INSERT = ("prefix", "suffix", "middle")  # the FIM tokens an insertion needs


def can_infill(llama) -> bool:
    """Whether the model has the FIM prefix, suffix and middle tokens (Ollama's "insert" capability)."""
    fim = llama.fim_tokens()
    return all(fim[name] is not None for name in INSERT)


def fim_tokens(llama, refusal: str = "this model cannot fill in the middle") -> dict[str, int | None]:
    """The model's FIM tokens (LlamaModel.fim_tokens); UsageError starting with `refusal` when it lacks one of the
    three an insertion needs."""
    fim = llama.fim_tokens()
    missing = [name for name in INSERT if fim[name] is None]
    if missing:
        raise UsageError(f"{refusal}: no FIM {', '.join(missing)} token")
    return fim


def layout(llama, fim: dict, prefix: list[int], suffix: list[int], spm: bool = False) -> list[int]:
    """BOS (where the model adds one), FIM prefix + prefix, FIM suffix + suffix (the other way round with `spm`),
    FIM middle: the model then writes what goes between."""
    pre, suf = [fim["prefix"], *prefix], [fim["suffix"], *suffix]
    first, last = (suf, pre) if spm else (pre, suf)
    return ([llama.bos] if llama.add_bos else []) + first + last + [fim["middle"]]


def insertion(llama, prompt: str, suffix: str, refusal: str = "this model cannot fill in the middle",
              spm: bool = False) -> list[int]:
    """The tokens asking for what goes between `prompt` and `suffix`, whole (Ollama's and OpenAI's `suffix`)."""
    fim = fim_tokens(llama, refusal)
    return layout(llama, fim, llama.tokenize(prompt, add_special=False), llama.tokenize(suffix, add_special=False),
                  spm)


def infill_tokens(llama, prefix: str, suffix: str, *, middle: str = "", extra: Iterable[Mapping] = (),
                  n_ctx: int, n_batch: int, n_predict: int, spm: bool = False,
                  refusal: str = "this model cannot fill in the middle") -> list[int]:
    """llama-server's /infill prompt: `extra` files ({"filename"?, "text"}) before it, `middle` (the start of the
    reply, special tokens parsed) after the prefix, cut to a batch of `n_batch` and a context of `n_ctx` that keeps
    `n_predict` tokens (-1: one) for the reply."""
    fim = fim_tokens(llama, refusal)

    def tok(text: str, special: bool = False) -> list[int]:
        return llama.tokenize(text, add_special=False, parse_special=special)

    head = [fim["repo"], *tok(FIM_PROJECT)] if fim["repo"] is not None else []
    for chunk in extra:
        if fim["file_sep"] is not None:
            head += [fim["file_sep"], *tok(chunk.get("filename", "tmp") + "\n")]
        else:
            head += tok(SNIPPET)
        head += tok(chunk["text"])
    if fim["file_sep"] is not None:
        head += [fim["file_sep"], *tok(FIM_FILE)]
    start = tok(middle, special=True)
    before, after = tok(prefix), tok(suffix)
    before = before[len(before) - min(len(before), 3 * (n_batch // 4)):]
    after = after[:max(0, min(len(after), n_batch // 4 - (2 + len(start))))]
    fim_part = layout(llama, fim, [*before, *start], after, spm)
    share = n_ctx - n_batch + 2  # llama-server's: n_ctx - n_batch - 2 * its server's n_predict, -1 by default
    room = n_ctx - len(fim_part) - max(n_predict, 1)
    n_extra = max(0, min(len(head), share, room))
    return head[len(head) - n_extra:] + fim_part
