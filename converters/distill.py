"""Distillation: the `edgelm distill` pipeline stage. A student checkpoint (usually a pruned copy of the
teacher) learns the teacher's distribution; the result is a standard checkpoint plus a report.

Loss = kl_weight · T² · KL(teacher_T ‖ student_T) + ce_weight · CE(data) + hidden_weight · MSE(normalized
hidden states at mapped layers) + exit_weight · Σ_k KL(student final ‖ exit_k) (LayerSkip-style exits
through trainable exit norms, so the early-exit runtime gets heads that agree with the model it serves).
`exit_norm_only` freezes the student and trains the exit norms alone.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgelm import fsutil
from edgelm.errors import ConversionError

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is the train/test extra
    raise ConversionError("distillation needs torch: pip install 'edgelm[train]'") from None

from .early_exit import EXIT_HEADS
from .export import atomic_folder, check_new_folder
from .surgery import copy_side_files
from .teacher import check_same_vocabulary, load_teacher

CHECKPOINT = ".distill-checkpoint"


@dataclass
class DistillOptions:
    steps: int = 200
    batch: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup: int = 20
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    exit_layers: tuple[int, ...] = ()
    exit_weight: float = 0.2
    exit_norm_only: bool = False
    exit_norm_lr: float = 1e-2
    top_k: int = 32  # teacher log-probabilities kept per position for a GGUF teacher
    eval_every: int = 50  # held-out perplexity every N steps (0: only before and after)
    eval_tokens: int = 8192
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else CPU
    n_threads: int | None = None

    def validate(self) -> None:
        for name in ("steps", "batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ConversionError(f"--{name.replace('_', '-')} must be at least 1")
        if self.temperature <= 0 or self.lr <= 0:
            raise ConversionError("--temperature and --lr must be positive")
        if min(self.kl_weight, self.ce_weight, self.hidden_weight, self.exit_weight) < 0:
            raise ConversionError("loss weights must be >= 0")
        if self.exit_norm_only and not self.exit_layers:
            raise ConversionError("--exit-norm-only needs --exit-layers")
        if not self.exit_norm_only and self.kl_weight + self.ce_weight + self.hidden_weight == 0:
            raise ConversionError("every loss weight is 0: nothing to train")

    def fingerprint(self) -> str:
        keep = {k: v for k, v in asdict(self).items() if k not in ("eval_every", "checkpoint_every", "n_threads")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DistillReport:
    teacher: str
    student: str
    output: str
    options: dict
    tokens_seen: int = 0
    seconds: float = 0.0
    teacher_perplexity: float | None = None  # held-out, HF teachers only (transformers, same windows)
    perplexity_before: float = 0.0
    perplexity_after: float = 0.0
    perplexity_during: dict[int, float] = field(default_factory=dict)
    loss_first: float = 0.0
    loss_last: float = 0.0
    exit_agreement: dict[int, float] = field(default_factory=dict)  # held-out top-1 agreement with the final

    @property
    def gap_recovered(self) -> float | None:
        """Share of the student's perplexity gap to the teacher that distillation closed."""
        if self.teacher_perplexity is None or self.perplexity_before <= self.teacher_perplexity:
            return None
        return (self.perplexity_before - self.perplexity_after) / (self.perplexity_before - self.teacher_perplexity)


class ExitNorm(torch.nn.Module):
    """weight · x / rms(x), the llama family's norm; starts as a copy of the final norm."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone().float())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _device(name: str) -> str:

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConversionError("--device cuda: no CUDA device here")
    return name


def cosine_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of `lr` (the reference models' schedule too)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def kl(target_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ q) from log-probabilities over the last axis, mean over positions."""
    return (target_logp.exp() * (target_logp - logq)).sum(-1).mean()


def exit_logits(model, hidden_states, exits, head_grad: bool = False) -> dict[int, torch.Tensor]:
    """lm_head(exit_norm_k(h_k)) for each exit layer k; hidden_states[k] is the residual stream after layer k-1,
    before any norm. head_grad=False keeps the exits' gradient out of the shared head."""
    head = model.lm_head.weight if head_grad else model.lm_head.weight.detach()
    return {int(k): F.linear(norm(hidden_states[int(k)]), head) for k, norm in exits.items()}


def encode(student_dir: Path, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(student_dir / "tokenizer.json"))
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def heldout_perplexity(model, stream: np.ndarray, device: str = "cpu", window: int = 512) -> float:
    """Non-overlapping windows; every token but each window's first is scored."""

    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, window):
            chunk = torch.from_numpy(stream[start:start + window][None]).to(device)
            if chunk.shape[1] < 2:
                break
            logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1].float(), dim=-1)
            nll -= logp.gather(1, chunk[0, 1:, None]).sum().item()
            count += chunk.shape[1] - 1
    model.train(was_training)
    return math.exp(nll / count)


def generate_text(teacher: str | Path, n_tokens: int, *, seed: int, max_tokens: int = 256,
                  n_threads: int | None = None) -> str:
    """Text the teacher writes itself, sampled through edgelm's runtime (a HF teacher is converted first)."""
    import edgelm
    from edgelm.converters import convert

    with tempfile.TemporaryDirectory(prefix="edgelm-distill-") as tmp:
        path = Path(teacher)
        if path.is_dir():
            path = convert(path, Path(tmp) / "teacher.gguf", outtype="f16", progress=False).path
        parts, total = [], 0
        with edgelm.load(path, n_ctx=max_tokens + 16, n_threads=n_threads, seed=seed) as m:
            while total < n_tokens:
                out = m.generate("", max_tokens=max_tokens, temperature=1.0, seed=seed + len(parts))
                parts.append(out.text)
                total += max(1, out.timings.completion_tokens)
    return "\n\n".join(parts)


def distill(teacher: str | Path, student: str | Path, out_dir: str | Path, *, data: list[str] | None = None,
            generate: int | None = None, heldout: str | None = None, options: DistillOptions | None = None,
            progress: bool | None = None) -> DistillReport:
    """Train the checkpoint at `student` towards `teacher` (a checkpoint directory or a GGUF) on `data` texts
    (or `generate` tokens the teacher writes); write the result to `out_dir` as a standard checkpoint."""
    import sys


    from edgelm import corpus

    o = options or DistillOptions()
    o.validate()
    student, out = Path(student), Path(out_dir)
    if not (student / "config.json").is_file():
        raise ConversionError(f"{student}: not a checkpoint directory (no config.json)")
    state_dir = out / CHECKPOINT
    check_new_folder(out, allowed=(CHECKPOINT,))  # a run's own checkpoint may stay: it resumes
    if (data is None) == (generate is None):
        raise ConversionError("give training text (--data) or --generate N, one of the two")
    device = _device(o.device)
    if o.n_threads:
        torch.set_num_threads(o.n_threads)
    torch.manual_seed(o.seed)
    progress = sys.stderr.isatty() if progress is None else progress

    text = "\n\n".join(data) if data is not None else generate_text(teacher, generate, seed=o.seed,
                                                                   n_threads=o.n_threads)
    stream = encode(student, text)
    n_windows = len(stream) // (o.seq_len + 1)
    if n_windows < 1:
        raise ConversionError(f"training text too short: {len(stream)} tokens, need at least {o.seq_len + 1}")
    windows = stream[: n_windows * (o.seq_len + 1)].reshape(n_windows, o.seq_len + 1)
    held = encode(student, heldout if heldout is not None else corpus.text("heldout", max_chars=60_000))
    held = held[: o.eval_tokens]

    out.mkdir(parents=True, exist_ok=True)
    teach = load_teacher(teacher, device=device, windows=windows, cache_dir=state_dir, top_k=o.top_k,
                         n_threads=o.n_threads, progress=progress)
    check_same_vocabulary(teach.vocab, student)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).to(device)
    n_layer = model.config.num_hidden_layers
    if bad := [k for k in o.exit_layers if not 0 < k < n_layer]:
        raise ConversionError(f"--exit-layers {bad[0]}: exits lie in 1..{n_layer - 1} for this student")
    exits = torch.nn.ModuleDict({str(k): ExitNorm(model.model.norm.weight, model.config.rms_norm_eps)
                                 for k in sorted(set(o.exit_layers))}).to(device)
    projection = _projection(model, teach, o, device)
    report = DistillReport(str(teacher), str(student), str(out), asdict(o))
    if getattr(teach, "model", None) is not None:
        report.teacher_perplexity = round(heldout_perplexity(teach.model, held, device), 3)
    report.perplexity_before = round(heldout_perplexity(model, held, device), 3)

    trainable = list(exits.parameters()) if o.exit_norm_only else [*model.parameters(), *projection.parameters()]
    for p in model.parameters():
        p.requires_grad_(not o.exit_norm_only)
    groups = [{"params": trainable, "lr_scale": 1.0}]
    if exits and not o.exit_norm_only:
        groups.append({"params": list(exits.parameters()), "lr_scale": o.exit_norm_lr / o.lr})
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(o.seed)
    start = _resume(state_dir, o, model, exits, projection, opt, rng, report)

    from tqdm import tqdm

    bar = tqdm(total=o.steps, initial=start, desc="distilling", unit="step", disable=not progress)
    t0, tokens = time.perf_counter(), 0
    model.train()
    for step in range(start, o.steps):
        idx = rng.integers(0, n_windows, o.batch)
        ids = torch.from_numpy(windows[idx]).to(device)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, o.lr, o.warmup, o.steps) * g["lr_scale"]
        loss, parts = _loss(model, teach, exits, projection, ids, idx, o)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += o.batch * o.seq_len
        report.loss_first = report.loss_first or loss.item()
        report.loss_last = loss.item()
        bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in parts.items()},
                        tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        bar.update(1)
        done = step + 1
        if o.eval_every and done % o.eval_every == 0 and done < o.steps:
            report.perplexity_during[done] = round(heldout_perplexity(model, held, device), 3)
            bar.write(f"step {done}: held-out perplexity {report.perplexity_during[done]}")
        if o.checkpoint_every and done % o.checkpoint_every == 0 and done < o.steps:
            _save_state(state_dir, o, done, model, exits, projection, opt, rng, report)
    bar.close()
    report.seconds = round(report.seconds + time.perf_counter() - t0, 1)
    report.tokens_seen = o.steps * o.batch * o.seq_len
    report.perplexity_after = round(heldout_perplexity(model, held, device), 3)
    if exits:
        report.exit_agreement = exit_agreement(model, exits, held, device)
    _write_output(model, exits, student, out, report)
    return report


def _projection(model, teacher, o: DistillOptions, device: str):
    """Student hidden size -> teacher's, for hidden-state matching (identity-initialized when they differ)."""

    if not o.hidden_weight:
        return torch.nn.ModuleList()
    if getattr(teacher, "model", None) is None:
        raise ConversionError("hidden-state matching needs a Hugging Face teacher")
    ds, dt = model.config.hidden_size, teacher.model.config.hidden_size
    if ds == dt:
        return torch.nn.ModuleList()
    proj = torch.nn.Linear(ds, dt, bias=False)
    torch.nn.init.eye_(proj.weight)
    return torch.nn.ModuleList([proj]).to(device)


def _loss(model, teacher, exits, projection, ids, idx, o: DistillOptions):

    inputs, labels = ids[:, :-1], ids[:, 1:]
    need_hidden = bool(exits) or o.hidden_weight > 0
    with torch.set_grad_enabled(not o.exit_norm_only):
        res = model(input_ids=inputs, output_hidden_states=need_hidden)
    logits = res.logits.float()
    parts, loss = {}, logits.new_zeros(())
    if not o.exit_norm_only:
        t_logp, t_idx, t_hidden = teacher.log_probs(inputs, idx, o.temperature, hidden=o.hidden_weight > 0)
        s_logp = torch.log_softmax(logits / o.temperature, dim=-1)
        if t_idx is None:
            distance = kl(t_logp, s_logp) * o.temperature ** 2
        else:
            distance = _top_k_kl(t_logp, s_logp.gather(-1, t_idx))
        parts["kl"] = distance.item()
        loss = loss + o.kl_weight * distance
        if o.ce_weight:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            parts["ce"] = ce.item()
            loss = loss + o.ce_weight * ce
        if o.hidden_weight:
            hid = _hidden_loss(res.hidden_states, t_hidden, projection)
            parts["hidden"] = hid.item()
            loss = loss + o.hidden_weight * hid
    if exits:
        target = torch.log_softmax(logits.detach(), dim=-1)  # agreement with the model the runtime serves
        for k, z in exit_logits(model, res.hidden_states, exits).items():
            ex = kl(target, torch.log_softmax(z.float(), dim=-1))
            parts[f"exit{k}"] = ex.item()
            loss = loss + o.exit_weight * ex
    return loss, parts


def _top_k_kl(t_logp, s_logp):
    """KL over the teacher's top k tokens plus one bucket for the rest of the vocabulary: renormalizing the
    top k instead would teach the student to put all its mass there."""
    p = t_logp.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-6)
    q_rest = (1 - s_logp.exp().sum(-1)).clamp_min(1e-6)
    return ((p * (t_logp - s_logp)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).mean()


def _hidden_loss(student_states, teacher_states, projection):
    """MSE of RMS-normalized residual streams, student layer l against teacher layer round(l·Lt/Ls)."""

    ls, lt = len(student_states) - 1, len(teacher_states) - 1
    total = 0.0
    for layer in range(1, ls + 1):
        s = student_states[layer].float()
        if len(projection):
            s = projection[0](s)
        t = teacher_states[round(layer * lt / ls)].float()
        s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
        total = total + (s - t).pow(2).mean()
    return total / ls


def exit_agreement(model, exits, stream: np.ndarray, device: str = "cpu", window: int = 512) -> dict[int, float]:
    """Held-out share of positions where each exit's argmax (exit norm, then the shared head) is the model's own."""
    was_training = model.training
    model.eval()
    hits, count = {int(k): 0 for k in exits}, 0
    with torch.no_grad():
        for start in range(0, len(stream), window):
            chunk = torch.from_numpy(stream[start:start + window][None]).to(device)
            res = model(input_ids=chunk, output_hidden_states=True)
            full = res.logits.argmax(-1)
            for k, z in exit_logits(model, res.hidden_states, exits).items():
                hits[k] += (z.argmax(-1) == full).sum().item()
            count += chunk.shape[1]
    model.train(was_training)
    return {k: round(h / count, 4) for k, h in hits.items()}


# ---------------------------------------------------------------- checkpoints and output
def _save_state(state_dir: Path, o, step, model, exits, projection, opt, rng, report) -> None:
    """Everything a resumed run needs; weights as safetensors, optimizer through torch.save (tensors only)."""
    from safetensors.torch import save_file

    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, module in (("model.", model), ("exits.", exits), ("projection.", projection)):
        # clones: safetensors refuses tensors sharing memory (a tied embedding and head)
        tensors |= {prefix + k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    with fsutil.atomic_path(state_dir / "weights.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with fsutil.atomic_path(state_dir / "optimizer.pt") as tmp:
        torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}, tmp)
    meta = {"fingerprint": o.fingerprint(), "step": step, "rng": rng.bit_generator.state,
            "report": {k: v for k, v in asdict(report).items() if k in ("perplexity_during", "loss_first", "seconds")}}
    fsutil.atomic_write(state_dir / "state.json", json.dumps(meta, default=int).encode())


def _resume(state_dir: Path, o, model, exits, projection, opt, rng, report) -> int:
    from safetensors.torch import load_file

    meta_path = state_dir / "state.json"
    if not meta_path.is_file():
        return 0
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != o.fingerprint():
        raise ConversionError(f"{state_dir}: a checkpoint of a run with other options; use those options to "
                              "resume, or a new output folder")
    tensors = load_file(str(state_dir / "weights.safetensors"))
    for prefix, module in (("model.", model), ("exits.", exits), ("projection.", projection)):
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    saved = torch.load(state_dir / "optimizer.pt", weights_only=True)  # the restricted unpickler: tensors only
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    rng.bit_generator.state = meta["rng"]
    report.perplexity_during = {int(k): v for k, v in meta["report"]["perplexity_during"].items()}
    report.loss_first, report.seconds = meta["report"]["loss_first"], meta["report"]["seconds"]
    return int(meta["step"])


def _write_output(model, exits, student: Path, out: Path, report: DistillReport) -> None:
    """The student's weights (its own dtype), tokenizer files, exit norms and report; then drop the checkpoint."""
    from safetensors.torch import save_file

    with atomic_folder(out, allowed=(CHECKPOINT,)) as tmp:
        config = json.loads((student / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        model.to("cpu").to(getattr(torch, dtype) if dtype in ("float16", "bfloat16") else torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        copy_side_files(student, tmp)
        if exits:
            save_file({f"exit_norm.{k}.weight": n.weight.detach().float().cpu().contiguous() for k, n in exits.items()},
                      str(tmp / EXIT_HEADS), metadata={"format": "pt"})
        (tmp / "distill_report.json").write_text(json.dumps(asdict(report) | {"gap_recovered": report.gap_recovered},
                                                            indent=2) + "\n")
