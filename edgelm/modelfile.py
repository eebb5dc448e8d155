"""Named models from Ollama-style Modelfiles: `edgelm create NAME -f Modelfile`, then `edgelm run NAME`.

A Modelfile names a base model and what to run it with:

    FROM ./model.gguf            # a GGUF file (relative to the Modelfile), hf://owner/repo/file.gguf, or a name
    ADAPTER ./lora.gguf          # LoRA adapters (repeatable)
    PARAMETER temperature 0.7    # Ollama's parameter names: num_ctx, num_predict, top_k, top_p, min_p, stop, ...
    SYSTEM \"\"\"You are ...\"\"\"    # the system message of every chat that has none
    MESSAGE user Hello           # example turns put before every chat
    TEMPLATE \"\"\"...\"\"\"          # a Jinja chat template (Ollama's Go templates are refused, with the reason)
    LICENSE \"\"\"...\"\"\"

FROM may also name a safetensors checkpoint's folder and ADAPTER a PEFT adapter's folder: `create` converts them
(and quantizes the model with `-q TYPE`) into $EDGELM_HOME/blobs (blob_models.py), where they go when the last
record using them is removed or replaced. `create` checks it all and writes NAME's record, a JSON file in
$EDGELM_HOME/models (default ~/.edgelm/models), atomically; GGUF files the Modelfile names are not copied, so they
must stay where they are.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelNotFoundError, UsageError
from .fsutil import atomic_write
from .hub import is_hub_ref, normalize

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}(?::[a-z0-9][a-z0-9._-]{0,31})?")
SAMPLING = {  # Ollama's PARAMETER names -> SamplingParams fields
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "repeat_last_n": "penalty_last_n", "seed": "seed",
    "num_predict": "max_tokens", "stop": "stop", "mirostat": "mirostat", "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
LOAD = {"num_ctx": "n_ctx", "num_thread": "n_threads", "num_gpu": "n_gpu_layers", "num_batch": "n_batch"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Profile:
    """A named model: the base, its adapters, load options, sampling defaults and the chat's preamble."""

    name: str
    model: str  # an absolute GGUF path or an hf:// reference
    adapters: tuple[str, ...] = ()
    load: dict = field(default_factory=dict)  # edgelm.load() options: n_ctx, n_threads, ...
    sampling: dict = field(default_factory=dict)  # SamplingParams fields
    system: str | None = None
    messages: tuple[dict, ...] = ()
    template: str | None = None  # Jinja chat template
    license: str | None = None
    created: float = 0.0

    def load_options(self) -> dict:
        """edgelm.load() keyword arguments (a caller's own override them)."""
        extra = {"lora": list(self.adapters)} if self.adapters else {}
        return {**self.load, **extra, **({"chat_template": self.template} if self.template else {})}

    def parameters(self) -> str:
        """PARAMETER lines' text as Ollama's /api/show gives it: "name value" per line."""
        names = {v: k for k, v in SAMPLING.items()} | {v: k for k, v in LOAD.items()}
        lines = []
        for key, value in [*self.load.items(), *self.sampling.items()]:
            for one in value if isinstance(value, list) else [value]:
                lines.append(f"{names[key]} {json.dumps(one) if isinstance(one, str) else one}")
        return "\n".join(lines)

    def modelfile(self) -> str:
        """A Modelfile that creates this record again."""
        quoted = lambda text: f'"""{text}"""'  # noqa: E731
        lines = [f"FROM {self.model}", *(f"ADAPTER {a}" for a in self.adapters),
                 *(f"PARAMETER {line}" for line in self.parameters().splitlines())]
        lines += [f"SYSTEM {quoted(self.system)}"] if self.system else []
        lines += [f"MESSAGE {m['role']} {m['content']}" for m in self.messages]
        lines += [f"TEMPLATE {quoted(self.template)}"] if self.template else []
        lines += [f"LICENSE {quoted(self.license)}"] if self.license else []
        return "\n".join(lines) + "\n"

    def preamble(self, messages: list[dict]) -> list[dict]:
        """`messages` with the system message (if they have none) and the example turns before them."""
        has_system = any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
        head = [] if has_system or not self.system else [{"role": "system", "content": self.system}]
        if has_system and messages and messages[0].get("role") == "system":  # examples go after the system
            return [messages[0], *map(dict, self.messages), *messages[1:]]
        return [*head, *map(dict, self.messages), *messages]


def home() -> Path:
    return Path(os.environ.get("EDGELM_HOME") or Path.home() / ".edgelm").expanduser() / "models"


def check_name(name: str) -> str:
    """NAME or NAME:TAG, lower case; the tag defaults to latest, as in Ollama."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UsageError(f"model name {name!r}: use lower-case letters, digits, '.', '_', '-' (and ':TAG')")
    return name if ":" in name else f"{name}:latest"


def _path(name: str) -> Path:
    base, tag = check_name(name).split(":")
    return home() / f"{base}@{tag}.json"  # inside the folder: the name's characters cannot climb out


def find(ref) -> Profile | None:
    """The named model `ref` refers to, or None when it is a file or not a name that was created (a file of the
    same name, in the working folder, wins)."""
    if not isinstance(ref, str) or not NAME.fullmatch(ref) or os.path.exists(ref):
        return None
    return _read(ref)


def _read(ref: str) -> Profile | None:
    path = _path(ref)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Profile(**{**data, "adapters": tuple(data.get("adapters", ())),
                          "messages": tuple(data.get("messages", ()))})
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{path}: a broken model record ({e}); remove it with `edgelm rm {ref}`") from None


def profiles() -> list[Profile]:
    folder = home()
    names = sorted(p.stem.replace("@", ":") for p in folder.glob("*@*.json")) if folder.is_dir() else []
    return [p for p in map(find, names) if p is not None]


def remove(name: str) -> Path | None:
    """Delete NAME's record, and the blobs (blobs.py) it used that no other record uses; its path, or None."""
    path = _path(name)
    if not path.is_file():
        return None
    old = _previous(name)
    path.unlink()
    _prune(old)
    return path


def _previous(name: str) -> Profile | None:
    """NAME's record before it goes or is replaced (None if broken: a broken record can still be removed)."""
    try:
        return _read(name)
    except UsageError:
        return None


def _prune(old: Profile | None) -> None:
    """Remove the blobs `old` (a record just deleted or replaced) used and no record uses now."""
    from . import blobs

    if old is not None:
        blobs.prune([old.model, *old.adapters], used_files())


def used_files() -> set[str]:
    """The model and adapter files the records name (broken records name none)."""
    records = [_previous(p.stem.replace("@", ":")) for p in home().glob("*@*.json")] if home().is_dir() else []
    return {f for p in records if p is not None for f in (p.model, *p.adapters)}


# ---------------------------------------------------------------------------- parsing


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs: one per line, an argument in \"\"\"...\"\"\" may span lines; # comments."""
    out, i, lines = [], 0, text.splitlines()
    while i < len(lines):
        line, i = lines[i].strip(), i + 1
        if not line or line.startswith("#"):
            continue
        word, _, arg = line.partition(" ")
        arg = arg.strip()
        if arg.startswith('"""'):
            body = arg[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise UsageError(f"Modelfile: {word} opens a \"\"\" that never closes")
                body, i = body + "\n" + lines[i], i + 1
            arg, rest = body.split('"""', 1)
            if rest.strip():
                raise UsageError(f"Modelfile: text after the closing \"\"\" of {word}: {rest.strip()!r}")
        elif len(arg) >= 2 and arg[0] == arg[-1] == '"':
            arg = arg[1:-1]
        out.append((word.upper(), arg))
    return out


def _value(key: str, raw: str):
    """A PARAMETER's value as the type SamplingParams / load options want."""
    ints = {"top_k", "repeat_last_n", "seed", "num_predict", "num_ctx", "num_thread", "num_gpu", "num_batch",
            "mirostat"}
    try:
        value = int(raw) if key in ints else float(raw)
    except ValueError:
        raise UsageError(f"Modelfile: PARAMETER {key} {raw!r}: not a number") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"Modelfile: PARAMETER {key} {raw!r}: not a finite number")
    return value


def _parameter(fields: dict, key: str, raw: str) -> None:
    if key == "stop":
        fields["sampling"].setdefault("stop", []).append(raw)
    elif key in SAMPLING:
        fields["sampling"][SAMPLING[key]] = _value(key, raw)
    elif key in LOAD:
        fields["load"][LOAD[key]] = _value(key, raw)
    else:
        raise UsageError(f"Modelfile: PARAMETER {key} is not supported "
                         f"(known: {', '.join(sorted([*SAMPLING, *LOAD]))})")


def build(name: str, text: str, base_dir: Path, parameters: dict | None = None, model: str | None = None) -> Profile:
    """A Profile from Modelfile `text` whose relative paths start at `base_dir`, and `parameters` (PARAMETER
    values by name, as Ollama's /api/create sends them, lists for stop); everything checked. `model` stands for
    FROM in a text without one (a model still being made: it is not checked)."""
    from .gguf_reader import read_gguf
    from .runtime.chat import ChatTemplate
    from .runtime.sampling import SamplingParams

    name = check_name(name)
    fields: dict = {"name": name, "adapters": [], "load": {}, "sampling": {}, "messages": []}
    base: Profile | None = None
    for word, arg in parse(text):
        if word == "FROM":
            if "model" in fields:
                raise UsageError("Modelfile: more than one FROM")
            base = find(arg)
            fields["model"] = base.model if base else _model_ref(arg, base_dir, read_gguf)
        elif word == "ADAPTER":
            path = (base_dir / Path(arg).expanduser()).resolve()
            if path.is_dir():  # a PEFT adapter's folder: `create` converts it against FROM's checkpoint
                if not (path / "adapter_config.json").is_file():
                    raise UsageError(f"Modelfile: ADAPTER {arg}: a folder without adapter_config.json")
                fields["adapters"].append(str(path))
                continue
            if not path.is_file():
                raise ModelNotFoundError(f"Modelfile: ADAPTER {arg}: no such file")
            if read_gguf(path, keep_arrays=False).get("general.type") != "adapter":
                raise UsageError(f"Modelfile: ADAPTER {arg}: not a LoRA adapter GGUF "
                                 "(`edgelm convert ADAPTER_DIR --base HF_DIR` writes one)")
            fields["adapters"].append(str(path))
        elif word == "PARAMETER":
            key, _, raw = arg.partition(" ")
            _parameter(fields, key, raw.strip().strip('"'))
        elif word == "SYSTEM":
            fields["system"] = arg
        elif word == "MESSAGE":
            role, _, content = arg.partition(" ")
            if role not in ROLES:
                raise UsageError(f"Modelfile: MESSAGE role {role!r}: one of {', '.join(ROLES)}")
            fields["messages"].append({"role": role, "content": content.strip().strip('"')})
        elif word == "TEMPLATE":
            if re.search(r"\{\{-?\s*\.", arg):
                raise UsageError("Modelfile: TEMPLATE is an Ollama Go template; edgelm renders Jinja chat "
                                 "templates (as in tokenizer.chat_template): write it in Jinja")
            # a template that does not parse, or reaches for Python internals, fails now rather than in a chat
            ChatTemplate(arg).render([{"role": "user", "content": "hi"}])
            fields["template"] = arg
        elif word == "LICENSE":
            fields["license"] = arg
        elif word != "REQUIRES":
            raise UsageError(f"Modelfile: unknown instruction {word}")
    for key, value in (parameters or {}).items():
        for one in value if isinstance(value, list) and key == "stop" else [value]:
            if isinstance(one, bool) or not isinstance(one, str if key == "stop" else (int, float)):
                raise UsageError(f"parameters.{key} must be {'strings' if key == 'stop' else 'a number'}, "
                                 f"not {one!r}")
            _parameter(fields, key, one if key == "stop" else str(one))
    if "model" not in fields:
        if model is None:
            raise UsageError("Modelfile: no FROM line")
        fields["model"] = model
    if base is not None:  # FROM another name: its settings, then this Modelfile's on top
        fields = {**asdict(base), **{k: v for k, v in fields.items() if v not in ([], {}, None)},
                  "adapters": [*base.adapters, *fields["adapters"]], "load": {**base.load, **fields["load"]},
                  "sampling": {**base.sampling, **fields["sampling"]},
                  "messages": [*base.messages, *fields["messages"]], "name": name}
    SamplingParams.from_kwargs(**fields["sampling"])  # bad values fail now, naming the field
    n_ctx = fields["load"].get("n_ctx")
    if n_ctx is not None and n_ctx < 1:
        raise UsageError(f"Modelfile: PARAMETER num_ctx must be positive, not {n_ctx}")
    return Profile(**{**fields, "adapters": tuple(fields["adapters"]), "messages": tuple(fields["messages"]),
                      "created": time.time()})


def _model_ref(arg: str, base_dir: Path, read_gguf) -> str:
    if is_hub_ref(arg):
        return normalize(arg)
    path = (base_dir / Path(arg).expanduser()).resolve()
    if path.is_dir():  # a safetensors checkpoint's folder: `create` converts it
        if not (path / "config.json").is_file():
            raise UsageError(f"Modelfile: FROM {arg}: a folder without config.json (a checkpoint's is expected)")
        return str(path)
    if not path.is_file():
        raise ModelNotFoundError(f"Modelfile: FROM {arg}: no such GGUF file, checkpoint folder or named model")
    if read_gguf(path, keep_arrays=False).get("general.type") == "adapter":
        raise UsageError(f"Modelfile: FROM {arg} is a LoRA adapter; give the base model in FROM and it in ADAPTER")
    return str(path)


def create(name: str, modelfile: str | Path, quantize: str | None = None, status=lambda text: None) -> Profile:
    """Check the Modelfile and record NAME (replacing an older record of it). A checkpoint folder in FROM is
    converted and a PEFT folder in ADAPTER converted against it, the model quantized to `quantize` if given,
    each into a blob of $EDGELM_HOME/blobs (blob_models.py); `status(text)` hears each step."""
    from .blob_models import materialized, quant_type

    path = Path(modelfile).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the Modelfile: {e}") from None
    if quantize is not None:
        quant_type(quantize)  # a bad type fails before any conversion
    return save(materialized(build(name, text, path.resolve().parent), quantize, status))


def save(profile: Profile) -> Profile:
    """Write a named model's record (replacing an older record of the name), atomically."""
    target = _path(profile.name)
    old = _previous(profile.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, json.dumps(asdict(profile), ensure_ascii=False, indent=1).encode("utf-8"))
    _prune(old)
    return profile
