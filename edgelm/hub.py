"""Model references on the Hugging Face Hub, fetched through huggingface_hub's cache.

    hf://owner/repo/path/file.gguf[@revision]   one file
    hf://owner/repo[:QUANT][@revision]          the repo's GGUF whose name carries QUANT (e.g. Q4_K_M);
                                                without QUANT, the repo's only GGUF
    hf.co/owner/repo[:QUANT]                    Ollama's name for the same (huggingface.co/... too)

huggingface_hub does the transfer and owns its environment: HF_ENDPOINT (the server), HF_HOME / HF_HUB_CACHE
(the cache), HF_TOKEN (gated and private repos), HF_HUB_OFFLINE=1 (the cache only). A cached file costs one
HEAD request (or none offline). Downloads go to a unique temporary file renamed into the cache when complete,
so an interrupted download never leaves a file that later loads. edgelm checks the reference before any
request, and turns every failure into one edgelm error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from edgelm.errors import DownloadError, ModelNotFoundError, UsageError

SCHEME = "hf://"
OLLAMA_HOSTS = ("hf.co/", "huggingface.co/")  # `ollama pull hf.co/owner/repo:Q4_K_M` names Hub models so
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # one half of owner/repo, as the Hub allows
_QUANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")  # a branch, tag, commit or refs/pr/N
_FILE_PART_BAD = re.compile(r"[\x00-\x1f\x7f\\:@%?#*]")  # separators, escapes and wildcards
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)  # llama.cpp's split files


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # owner/repo
    filename: str | None = None  # a path inside the repo; None: chosen by `quant`
    quant: str | None = None
    revision: str | None = None  # None: the default branch

    def __str__(self) -> str:
        tail = f"/{self.filename}" if self.filename else f":{self.quant}" if self.quant else ""
        return f"{SCHEME}{self.repo_id}{tail}" + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(ref) -> bool:
    return isinstance(ref, str) and ref.startswith((SCHEME, *OLLAMA_HOSTS))


def normalize(ref: str) -> str:
    """Ollama's hf.co/owner/repo:QUANT as hf://owner/repo:QUANT; anything else unchanged."""
    for host in OLLAMA_HOSTS:
        if ref.startswith(host):
            return SCHEME + ref[len(host):]
    return ref


# ------------------------------------------------------------ parsing

def parse_ref(ref: str) -> HubRef:
    """Checks a reference without touching the network: no traversal, no absolute paths, GGUF files only."""
    if not is_hub_ref(ref):
        raise UsageError(f"{ref!r}: not a Hub reference (expected {SCHEME}owner/repo/file.gguf)")
    ref = normalize(ref)
    body, at, revision = ref[len(SCHEME):].partition("@")
    if at and not (_REVISION.fullmatch(revision) and ".." not in revision.split("/")):
        raise UsageError(f"{ref}: bad revision {revision!r} (a branch, tag or commit hash)")
    owner, _, rest = body.partition("/")
    name, _, filename = rest.partition("/")
    name, colon, quant = name.partition(":")
    for part in (owner, name):
        if not _NAME.fullmatch(part) or ".." in part or "--" in part or part.endswith((".", ".git")):
            raise UsageError(f"{ref}: bad repository id {owner + '/' + name!r} (expected {SCHEME}owner/repo/...)")
    if len(owner) + 1 + len(name) > 96:
        raise UsageError(f"{ref}: repository id longer than the Hub's 96 characters")
    if colon and (filename or not _QUANT.fullmatch(quant)):
        raise UsageError(f"{ref}: bad quant {quant!r} (use {SCHEME}owner/repo:Q4_K_M or name the file)")
    if filename:
        check_filename(filename, ref)
    elif rest.endswith("/"):
        raise UsageError(f"{ref}: empty file name")
    return HubRef(f"{owner}/{name}", filename or None, quant or None, revision or None)


def check_filename(filename: str, ref: str = "") -> None:
    """A relative path inside the repo; `..`, absolute paths and escapes could leave the cache folder."""
    parts = filename.split("/")
    where = f"{ref}: " if ref else ""
    for part in parts:
        if part in ("", ".", "..") or _FILE_PART_BAD.search(part) or len(part) > 255:
            raise UsageError(f"{where}bad file name {filename!r} (a relative path inside the repository, no '..')")
    if not filename.lower().endswith(".gguf"):
        raise UsageError(f"{where}{filename!r} is not a GGUF file (edgelm loads .gguf files)")


# ------------------------------------------------------------ choosing a file

def shards(filename: str) -> list[str]:
    """Every part of a split GGUF (llama.cpp's -0000i-of-0000n naming), or [filename] alone."""
    m = _SHARD.match(filename)
    if not m:
        return [filename]
    n = int(m["n"])
    return [f"{m['stem']}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


def choose_file(files: list[str], quant: str | None, ref: str, source: str = "the repository") -> str:
    """The one model file of `files` whose name carries `quant` (the first part of a split one)."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower())
    models = sorted({shards(f)[0] for f in ggufs})
    if quant:
        tag = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)
        models = [f for f in models if tag.search(PurePosixPath(f).name)]
    listing = ", ".join(ggufs) or "none"
    if len(models) == 1:
        return models[0]
    if not models:
        raise ModelNotFoundError(f"{ref}: no GGUF file{' for ' + quant if quant else ''} in {source} "
                                 f"(GGUF files: {listing})")
    raise UsageError(f"{ref}: {len(models)} GGUF files match, name one: {', '.join(models)}")


# ------------------------------------------------------------ fetching

def fetch(ref: str, on_part=None, on_bytes=None) -> Path:
    """The local path of a Hub reference, downloading it (and its split parts) into the cache if needed;
    `on_part(filename, path)` hears of each part once it is in the cache, `on_bytes(filename, completed, total)`
    of each chunk that arrives (total: None if the Hub did not say)."""
    hub_ref = parse_ref(ref)
    filename = hub_ref.filename
    if filename is None:
        files, source = _list_files(hub_ref)
        filename = choose_file(files, hub_ref.quant, ref, source)
    paths = []
    for part in shards(filename):
        paths.append(_download(hub_ref, part, on_bytes))
        if on_part is not None:
            on_part(part, paths[-1])
    return paths[0]  # llama.cpp finds the other parts next to the first


def cached(ref: str) -> Path | None:
    """The cached file a Hub reference names (its first part), without asking the Hub; None if not cached."""
    hub_ref = parse_ref(ref)
    rev = _cached_revision(hub_ref)
    if rev is None or not rev.files:
        return None
    filename = hub_ref.filename
    if filename is None:
        try:
            filename = choose_file(_revision_files(rev), hub_ref.quant, ref, "the cached snapshot")
        except (UsageError, ModelNotFoundError):
            return None
    path = rev.snapshot_path / filename
    return path if path.is_file() else None


class _Progress:
    """What huggingface_hub's download loops (HTTP and Xet) ask of their `tqdm_class`: a context manager whose
    update(n) counts the file's bytes, each count going to `report(filename, completed, total)`. Having
    update_transfer makes the Xet loop use this one bar, not a second one for network bytes; the display calls
    (set_postfix_str, refresh, ...) do nothing."""

    report = staticmethod(lambda filename, completed, total: None)
    filename = ""

    def __init__(self, total: int | None = None, initial: int = 0, **_):
        self.total, self.n = total, initial or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.n += n
        self.report(self.filename, self.n, self.total)

    def update_transfer(self, n: int = 1) -> None:
        pass

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _download(ref: HubRef, filename: str, on_bytes=None) -> Path:
    from huggingface_hub import hf_hub_download

    progress = None if on_bytes is None else type("Progress", (_Progress,), {
        "report": staticmethod(on_bytes), "filename": filename})
    try:
        return Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision, tqdm_class=progress))
    except Exception as e:  # huggingface_hub and its HTTP client raise many types: each becomes one edgelm error
        raise _edgelm_error(e, ref, filename) from e


def _list_files(ref: HubRef) -> tuple[list[str], str]:
    """(the repo's files, where listed): the Hub's model-info API, or the cache when offline or unreachable."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cause: Exception = LocalEntryNotFoundError("offline mode")
    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().model_info(ref.repo_id, revision=ref.revision)
            return [s.rfilename for s in info.siblings or []], "the repository"
        except HfHubHTTPError as e:  # the Hub answered: no such repo, revision, access...
            raise _edgelm_error(e, ref, None) from e
        except Exception as e:  # it did not (connection, timeout, proxy): the cache may still have the files
            cause = LocalEntryNotFoundError("no answer")
            cause.__cause__ = e
    files = _cached_files(ref)
    if files is None:
        raise _edgelm_error(cause, ref, None)
    return files, "the cached snapshot (the Hub was not asked)"


def _cached_files(ref: HubRef) -> list[str] | None:
    """The files of the cached snapshot of ref's revision, None when none was downloaded."""
    rev = _cached_revision(ref)
    return _revision_files(rev) if rev is not None and rev.files else None  # failed downloads leave bare refs


def _revision_files(rev) -> list[str]:
    return [f.file_path.relative_to(rev.snapshot_path).as_posix() for f in rev.files]


def _cached_repos() -> list:
    """huggingface_hub's CachedRepoInfo of every model repository in its cache."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        return [repo for repo in scan_cache_dir().repos if repo.repo_type == "model"]
    except CacheNotFound:
        return []


def _cached_revision(ref: HubRef):
    """huggingface_hub's CachedRevisionInfo of ref's revision (a branch, tag or commit; default main), or None."""
    revision = ref.revision or "main"
    for repo in _cached_repos():
        if repo.repo_id == ref.repo_id:
            for rev in repo.revisions:
                if revision in rev.refs or rev.commit_hash == revision:
                    return rev
    return None


# ------------------------------------------------------------ the cache: list and remove

@dataclass(frozen=True)
class CachedModel:
    ref: str  # hf://owner/repo/file.gguf, with @commit where the file is cached under no branch or tag name
    path: Path  # the snapshot entry llama.cpp loads
    size: int  # bytes, every part of a split model included
    refs: tuple[str, ...]  # the branches and tags that point at the cached revision
    commit: str


def cached_models() -> list[CachedModel]:
    """Every GGUF model in huggingface_hub's cache (split models once, by their first part), sorted by reference."""
    out = []
    for repo in _cached_repos():
        for rev in repo.revisions:
            files = {f.file_path.relative_to(rev.snapshot_path).as_posix(): f for f in rev.files}
            for name in sorted(n for n in files if n.lower().endswith(".gguf") and shards(n)[0] == n):
                size = sum(files[part].size_on_disk for part in shards(name) if part in files)
                at = "" if "main" in rev.refs else f"@{sorted(rev.refs)[0] if rev.refs else rev.commit_hash}"
                out.append(CachedModel(f"{SCHEME}{repo.repo_id}/{name}{at}", files[name].file_path, size,
                                       tuple(sorted(rev.refs)), rev.commit_hash))
    return sorted(out, key=lambda m: m.ref)


def remove(ref: str) -> list[Path]:
    """Delete a reference's cached model (every part of a split one) without asking the Hub; returns the snapshot
    entries removed. A blob another snapshot still links to stays."""
    from huggingface_hub import constants

    hub_ref = parse_ref(ref)
    rev, filename = _cached_revision(hub_ref), hub_ref.filename
    if filename is None:
        if rev is None or not rev.files:
            raise ModelNotFoundError(f"{ref}: nothing cached for {hub_ref.repo_id}"
                                     + (f" at {hub_ref.revision}" if hub_ref.revision else ""))
        filename = choose_file(_revision_files(rev), hub_ref.quant, ref, "the cached snapshot")
    root = Path(constants.HF_HUB_CACHE).resolve()
    snapshot = rev.snapshot_path if rev is not None else None
    entries = [snapshot / part for part in shards(filename)] if snapshot is not None else []
    entries = [e for e in entries if e.is_symlink() or e.is_file()]
    if not entries:
        raise ModelNotFoundError(f"{ref}: {filename} is not in the cache ({root})")
    linked = {p.resolve() for p in (snapshot.parent.glob("*/**/*")) if p.is_symlink() and p not in entries}
    for entry in entries:
        if not entry.resolve().is_relative_to(root) or not entry.absolute().is_relative_to(root):
            raise UsageError(f"{ref}: {entry} is outside the cache ({root}); not removing it")
    for entry in entries:
        blob = entry.resolve() if entry.is_symlink() else None
        entry.unlink()
        if blob is not None and blob not in linked and blob.is_file():
            blob.unlink()
    for folder in {e.parent for e in entries}:  # folders inside the snapshot the removal left empty
        while folder != snapshot and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return entries


def _edgelm_error(e: Exception, ref: HubRef, filename: str | None) -> Exception:
    from huggingface_hub import constants
    from huggingface_hub import errors as hfe

    where = str(replace(ref, filename=filename, quant=None) if filename else ref)
    endpoint = constants.ENDPOINT
    # most specific first: GatedRepoError is a RepositoryNotFoundError, every HTTP error an HfHubHTTPError
    if isinstance(e, hfe.GatedRepoError):
        return DownloadError(f"{where}: {ref.repo_id} is gated: accept its terms on {endpoint} and set HF_TOKEN")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return ModelNotFoundError(f"{where}: no repository {ref.repo_id} on {endpoint} "
                                  f"(or it is private: set HF_TOKEN)")
    if isinstance(e, hfe.RevisionNotFoundError):
        return ModelNotFoundError(f"{where}: no revision {ref.revision!r} in {ref.repo_id}")
    if isinstance(e, (hfe.LocalEntryNotFoundError, hfe.OfflineModeIsEnabled)):  # no answer, and nothing cached
        if constants.HF_HUB_OFFLINE:
            return DownloadError(f"{where}: not in the cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set")
        return DownloadError(f"{where}: could not fetch from {endpoint} and no cached copy: "
                             f"{_one_line(e.__cause__ or e)}")
    if isinstance(e, hfe.EntryNotFoundError):
        return ModelNotFoundError(f"{where}: no file {filename!r} in {ref.repo_id}"
                                  + (f" at {ref.revision}" if ref.revision else ""))
    if isinstance(e, hfe.HfHubHTTPError):
        return DownloadError(f"{where}: {endpoint} answered {_one_line(e)}")
    return DownloadError(f"{where}: download failed: {type(e).__name__}: {_one_line(e)}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
