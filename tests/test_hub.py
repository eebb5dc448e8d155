"""hf:// references: parsing and validation in-process; downloads in subprocesses against a stand-in Hub.

The stand-in implements what huggingface_hub's hf_hub_download and model_info use: HEAD/GET
/{repo}/resolve/{revision}/{file} answering with a 302 to a "CDN" (another host name of the same server)
carrying X-Repo-Commit, X-Linked-Etag and X-Linked-Size; GET/HEAD on the CDN with Range support; GET
/api/models/{repo}[/revision/{rev}] with the file list; and the Hub's X-Error-Code answers (401
RepoNotFound / GatedRepo, 404 RevisionNotFound / EntryNotFound). Each client is a fresh Python process,
because huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import edgelm
from edgelm import hub
from edgelm.errors import ModelNotFoundError, UsageError
from edgelm.runtime.model import default_model_path, resolve_model

GGUF = "edgelm-small-Q8_0.gguf"
REPO, GATED, FORBIDDEN = "edgelm/small-GGUF", "edgelm/gated", "edgelm/disabled"
COMMIT = hashlib.sha1(b"edgelm/small-GGUF@1").hexdigest()


# ------------------------------------------------------------ parsing (no network)

@pytest.mark.parametrize("ref, expected", [
    ("hf://edgelm/small-GGUF/model.gguf", ("edgelm/small-GGUF", "model.gguf", None, None)),
    ("hf://o/r/sub/dir/m.Q4_K_M.gguf@v1.0", ("o/r", "sub/dir/m.Q4_K_M.gguf", None, "v1.0")),
    ("hf://o/r:Q4_K_M", ("o/r", None, "Q4_K_M", None)),
    ("hf://o/r:q8_0@refs/pr/3", ("o/r", None, "q8_0", "refs/pr/3")),
    ("hf://o/r@" + "a" * 40, ("o/r", None, None, "a" * 40)),
    ("hf://o/r", ("o/r", None, None, None)),  # the repo's only GGUF
])
def test_parse_ref(ref, expected):
    r = hub.parse_ref(ref)
    assert (r.repo_id, r.filename, r.quant, r.revision) == expected and str(r) == ref


@pytest.mark.parametrize("name, ref", [("hf.co/o/r:Q4_K_M", "hf://o/r:Q4_K_M"), ("huggingface.co/o/r", "hf://o/r"),
                                       ("hf.co/o/r/m.gguf@v1", "hf://o/r/m.gguf@v1")])
def test_ollamas_hub_names(name, ref):
    """`ollama pull hf.co/owner/repo:QUANT` names a Hub model; edgelm reads it as hf://owner/repo:QUANT."""
    assert hub.is_hub_ref(name) and str(hub.parse_ref(name)) == ref and hub.normalize(name) == ref
    assert not hub.is_hub_ref("models/hf.co.gguf") and hub.normalize("./m.gguf") == "./m.gguf"


@pytest.mark.parametrize("ref, match", [
    ("hf://o/r/../../../etc/passwd.gguf", "bad file name"),  # traversal out of the cache
    ("hf://o/r/sub/../../x.gguf", "bad file name"),
    ("hf://o/r//etc/x.gguf", "bad file name"),  # an absolute path
    ("hf://o/r/./x.gguf", "bad file name"),
    ("hf://o/r/..%2f..%2fx.gguf", "bad file name"),  # escapes are not decoded, they are refused
    ("hf://o/r/a\\..\\x.gguf", "bad file name"),
    ("hf://o/r/C:x.gguf", "bad file name"),
    ("hf://o/r/x.gguf\x00.txt", "bad file name"),
    ("hf://o/r/", "empty file name"),
    ("hf://o/r/model.safetensors", "not a GGUF file"),
    ("hf://../r/x.gguf", "bad repository id"),
    ("hf://o/../x.gguf", "bad repository id"),
    ("hf://o/r--x/x.gguf", "bad repository id"),
    ("hf://o/r.git/x.gguf", "bad repository id"),
    ("hf://justrepo", "bad repository id"),
    ("hf://o/" + "r" * 100, "96 characters"),
    ("hf://o/r/x.gguf@../main", "bad revision"),
    ("hf://o/r/x.gguf@/main", "bad revision"),
    ("hf://o/r/x.gguf@", "bad revision"),
    ("hf://o/r:", "bad quant"),
    ("hf://o/r:Q4/x.gguf", "bad quant"),
])
def test_bad_refs_are_refused_before_any_request(ref, match, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("a request was made")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(UsageError, match=match):
        edgelm.load(ref)


@pytest.mark.parametrize("files, quant, expected", [
    (["a-Q4_K_M.gguf", "a-Q8_0.gguf", "README.md"], "Q8_0", "a-Q8_0.gguf"),
    (["a.Q4_K_M.gguf", "a.Q4_K_S.gguf"], "q4_k_m", "a.Q4_K_M.gguf"),  # case-insensitive
    (["a-Q4_K_M.gguf", "a-IQ4_K_M.gguf"], "Q4_K_M", "a-Q4_K_M.gguf"),  # whole tags only
    (["a-Q4_K_M.gguf", "mmproj-a-Q4_K_M.gguf"], "Q4_K_M", "a-Q4_K_M.gguf"),  # projectors are not models
    (["a-Q8_0.gguf", "README.md"], None, "a-Q8_0.gguf"),  # the only model
    (["a-F16-00002-of-00002.gguf", "a-F16-00001-of-00002.gguf", "a-Q8_0.gguf"], "F16",
     "a-F16-00001-of-00002.gguf"),  # a split model counts once, by its first part
])
def test_choose_file(files, quant, expected):
    assert hub.choose_file(files, quant, "hf://o/r") == expected


@pytest.mark.parametrize("files, quant, error, match", [
    (["a-Q8_0.gguf", "b.txt"], "Q4_K_M", ModelNotFoundError, r"no GGUF file for Q4_K_M .*a-Q8_0.gguf"),
    (["a-Q4_K.gguf"], "Q4_K_M", ModelNotFoundError, "a-Q4_K.gguf"),
    (["a-Q8_0.gguf", "a-F16.gguf"], None, UsageError, "2 GGUF files match, name one: a-F16.gguf, a-Q8_0.gguf"),
    (["README.md"], None, ModelNotFoundError, "GGUF files: none"),
])
def test_choose_file_errors_list_the_files(files, quant, error, match):
    with pytest.raises(error, match=match):
        hub.choose_file(files, quant, "hf://o/r")


def test_shards():
    assert hub.shards("m.gguf") == ["m.gguf"]
    assert hub.shards("d/m-00002-of-00003.gguf") == [f"d/m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


def test_plain_paths_still_resolve(tmp_path):
    assert resolve_model(str(default_model_path())) == default_model_path()
    with pytest.raises(ModelNotFoundError, match="no such model file"):
        edgelm.load(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError):
        edgelm.load("hf:/o/r/x.gguf")  # not the scheme: an ordinary (missing) path


# ------------------------------------------------------------ the stand-in Hub

class StandInHub:
    """A local HTTP server answering the Hub requests huggingface_hub makes; records every request."""

    def __init__(self):
        model = default_model_path().read_bytes()
        files = {GGUF: model, "edgelm-small-F16.gguf": b"not served in these tests", "README.md": b"# card\n"}
        self.repos = {REPO: files, GATED: {GGUF: model}, FORBIDDEN: {GGUF: model}}
        self.tags = {"main": COMMIT, "v1": COMMIT, COMMIT: COMMIT}
        self.blobs = {hashlib.sha256(data).hexdigest(): data for f in self.repos.values() for data in f.values()}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, lower-cased headers)
        self.reset()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self):
        self.requests.clear()
        self.short_body = False  # CDN answers a consistent but too short body
        self.cut = 0  # the next `cut` CDN GETs stop at 7/8 of the body, connection closed
        self.throttle = 0.0  # seconds between 64 KiB chunks
        self.sending = threading.Event()  # set once a CDN body has started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "GET"]


def _handler(hub_: StandInHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.serve(body=False)

        def do_GET(self):
            self.serve(body=True)

        def serve(self, body: bool):
            hub_.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            try:
                if parts[0] == "cdn":
                    return self.blob(parts[1], body)
                if parts[:2] == ["api", "models"]:
                    return self.info(parts[2:])
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self.resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
                self.answer(404, {})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (the interrupted-download test kills it)

        def answer(self, status, headers, data=b""):
            self.send_response(status)
            for k, v in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)

        def refuse(self, repo, revision):
            """The Hub's error answers; None when repo and revision exist."""
            if repo not in hub_.repos:
                return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
            if repo == GATED:
                return 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted"}
            if repo == FORBIDDEN:
                return 403, {"X-Error-Message": "Access to this resource is forbidden"}
            if revision not in hub_.tags:
                return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}
            return None

        def resolve(self, repo, revision, filename):
            refused = self.refuse(repo, revision)
            if refused:
                return self.answer(*refused)
            commit = {"X-Repo-Commit": hub_.tags[revision]}
            data = hub_.repos[repo].get(filename)
            if data is None:
                return self.answer(404, {"X-Error-Code": "EntryNotFound", **commit})
            sha = hashlib.sha256(data).hexdigest()
            # an LFS file: a redirect to another host, the file's metadata on the redirect itself
            self.answer(302, {**commit, "Location": f"http://localhost:{hub_.port}/cdn/{sha}",
                              "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                              "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})

        def info(self, parts):
            repo, revision = "/".join(parts[:2]), parts[3] if parts[2:3] == ["revision"] else "main"
            refused = self.refuse(repo, revision)
            if refused:
                return self.answer(*refused)
            siblings = [{"rfilename": name} for name in hub_.repos[repo]]
            data = json.dumps({"id": repo, "modelId": repo, "sha": hub_.tags[revision], "siblings": siblings})
            self.answer(200, {"Content-Type": "application/json"}, data.encode())

        def blob(self, sha, body):
            data = hub_.blobs[sha]
            start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
            headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            part = data[start:]
            if hub_.short_body:
                part = part[:len(part) // 2]
            self.send_response(206 if start else 200)
            for k, v in {**headers, "Content-Length": str(len(part))}.items():
                self.send_header(k, v)
            self.end_headers()
            if not body:
                return
            if hub_.cut:  # promise the whole file, send most of it, hang up
                hub_.cut -= 1
                self.wfile.write(part[:len(part) * 7 // 8])
                self.close_connection = True
                return
            for i in range(0, len(part), 1 << 16):
                self.wfile.write(part[i:i + (1 << 16)])
                hub_.sending.set()
                time.sleep(hub_.throttle)

    return Handler


@pytest.fixture(scope="module")
def standin():
    server = StandInHub()
    yield server
    server.server.shutdown()


@pytest.fixture
def hub_env(standin, tmp_path):
    """A client environment: the stand-in as endpoint, a fresh HF_HOME, no token, no progress bars."""
    standin.reset()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=standin.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    return env


CLIENT = r"""
import json, sys
import edgelm
from edgelm.errors import EdgelmError
for ref in sys.argv[1:]:
    try:
        with edgelm.load(ref, n_ctx=64, n_threads=1) as m:
            text = m.generate("def add(a, b):", max_tokens=4, temperature=0).text
            print(json.dumps({"path": str(m.path), "text": text}), flush=True)
    except EdgelmError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
"""


def client(env, *refs, offline=False) -> list[dict]:
    env = {**env, "HF_HUB_OFFLINE": "1"} if offline else env
    done = subprocess.run([sys.executable, "-c", CLIENT, *refs], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def expected_text():
    with edgelm.load(n_ctx=64, n_threads=1) as m:
        return m.generate("def add(a, b):", max_tokens=4, temperature=0).text


def _loaded(result: dict, env: dict, expected_text: str) -> Path:
    assert "error" not in result, result
    path = Path(result["path"])
    assert path.is_relative_to(Path(env["HF_HOME"]) / "hub")  # HF_HOME honoured
    assert path.read_bytes() == default_model_path().read_bytes() and result["text"] == expected_text
    return path


def _cache_state(env) -> tuple[list[Path], list[Path], list[Path]]:
    """(complete blobs, snapshot entries, leftover temporary files) of the client's cache."""
    root = Path(env["HF_HOME"]) / "hub"
    blobs = [p for p in root.rglob("blobs/*") if not p.name.endswith(".incomplete")]
    return blobs, list(root.rglob("snapshots/*/*")), list(root.rglob("*.incomplete"))


# ------------------------------------------------------------ downloads

def test_download_load_generate_then_cache_then_offline(standin, hub_env, expected_text):
    ref = f"hf://{REPO}/{GGUF}"
    _loaded(client(hub_env, ref)[0], hub_env, expected_text)
    assert standin.gets() == [f"/cdn/{hashlib.sha256(default_model_path().read_bytes()).hexdigest()}"]
    standin.reset()
    _loaded(client(hub_env, ref)[0], hub_env, expected_text)  # cached: one HEAD to check, no GET
    assert standin.gets() == [] and [m for m, *_ in standin.requests] == ["HEAD"]
    standin.reset()
    results = client(hub_env, ref, f"hf://{REPO}:Q8_0", f"hf://{REPO}:F16", offline=True)
    assert _loaded(results[0], hub_env, expected_text) == _loaded(results[1], hub_env, expected_text)
    assert results[2]["error"] == "ModelNotFoundError" and "cached snapshot" in results[2]["message"]
    assert standin.requests == []  # offline: the cache alone, quant choice included


def test_offline_without_a_cached_copy(standin, hub_env):
    (out,) = client(hub_env, f"hf://{REPO}/{GGUF}", offline=True)
    assert out["error"] == "DownloadError" and "not in the cache" in out["message"]
    assert "HF_HUB_OFFLINE" in out["message"]
    (out,) = client(hub_env, f"hf://{REPO}:Q8_0", offline=True)
    assert out["error"] == "DownloadError" and "HF_HUB_OFFLINE" in out["message"]
    assert standin.requests == []


def test_revisions_and_quant_selection(standin, hub_env, expected_text):
    results = client(hub_env, f"hf://{REPO}/{GGUF}@v1", f"hf://{REPO}/{GGUF}@{COMMIT}", f"hf://{REPO}:q8_0",
                     f"hf://{REPO}:Q4_K_M", f"hf://{REPO}")
    paths = [_loaded(r, hub_env, expected_text) for r in results[:3]]
    assert len(set(paths)) == 1 and COMMIT in str(paths[0])  # one snapshot, whatever named the revision
    # the file once, and a model-info listing for each quant choice
    assert standin.gets() == [f"/cdn/{hashlib.sha256(default_model_path().read_bytes()).hexdigest()}"] + \
        [f"/api/models/{REPO}"] * 3
    assert results[3]["error"] == "ModelNotFoundError" and GGUF in results[3]["message"]
    assert results[4]["error"] == "UsageError" and "2 GGUF files match" in results[4]["message"]


def test_hub_errors_are_edgelm_errors(standin, hub_env):
    results = client(hub_env, f"hf://{REPO}/missing.gguf", f"hf://edgelm/nope/{GGUF}", f"hf://{REPO}/{GGUF}@nobranch",
                     f"hf://{GATED}/{GGUF}", f"hf://{FORBIDDEN}/{GGUF}", "hf://edgelm/nope:Q8_0")
    kinds = [(r["error"], r["message"]) for r in results]
    assert kinds[0][0] == "ModelNotFoundError" and "no file 'missing.gguf'" in kinds[0][1]  # 404
    assert kinds[1][0] == "ModelNotFoundError" and "no repository edgelm/nope" in kinds[1][1]  # 401, no such repo
    assert kinds[2][0] == "ModelNotFoundError" and "no revision 'nobranch'" in kinds[2][1]
    assert kinds[3][0] == "DownloadError" and "gated" in kinds[3][1] and "HF_TOKEN" in kinds[3][1]  # 401 gated
    assert kinds[4][0] == "DownloadError" and "403" in kinds[4][1]
    assert kinds[5][0] == "ModelNotFoundError" and "no repository" in kinds[5][1]  # the listing API's 401
    assert _cache_state(hub_env)[0] == []


def test_short_download_leaves_nothing_that_loads(standin, hub_env, expected_text):
    standin.short_body = True  # the server closes the body early, at a consistent Content-Length
    (out,) = client(hub_env, f"hf://{REPO}/{GGUF}")
    assert out["error"] == "DownloadError" and "size" in out["message"]
    assert _cache_state(hub_env) == ([], [], [])  # no blob, no snapshot link, no temporary file
    assert all("not in the cache" in r["message"] for r in client(hub_env, f"hf://{REPO}/{GGUF}",
                                                                  f"hf://{REPO}:Q8_0", offline=True))
    standin.short_body = False
    _loaded(client(hub_env, f"hf://{REPO}/{GGUF}")[0], hub_env, expected_text)


def test_cut_connection_resumes_with_a_range_request(standin, hub_env, expected_text):
    # huggingface_hub writes 10 MiB chunks: a cut at 7/8 of our 17 MiB file leaves one written to resume from
    standin.cut = 1
    _loaded(client(hub_env, f"hf://{REPO}/{GGUF}")[0], hub_env, expected_text)
    ranges = [h.get("range") for m, p, h in standin.requests if m == "GET"]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] == f"bytes={10 << 20}-"


def test_killed_download_leaves_nothing_that_loads(standin, hub_env, expected_text):
    standin.throttle = 0.02  # ~6 s for the whole file: time to kill the client half way
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, f"hf://{REPO}/{GGUF}"], env=hub_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert standin.sending.wait(60)
        time.sleep(0.3)
    finally:
        proc.kill()  # SIGKILL: no clean-up code runs
        proc.wait()
    blobs, snapshots, partial = _cache_state(hub_env)
    assert blobs == [] and snapshots == [] and len(partial) == 1  # only the unique temporary file
    assert partial[0].stat().st_size < default_model_path().stat().st_size
    standin.throttle = 0.0
    _loaded(client(hub_env, f"hf://{REPO}/{GGUF}")[0], hub_env, expected_text)


# ------------------------------------------------------------ pull, list, rm

def cli(env, *args: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**env, "HF_HUB_OFFLINE": "1"} if offline else env
    return subprocess.run([sys.executable, "-m", "edgelm", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_pull_list_rm(standin, hub_env, expected_text):
    pulled = cli(hub_env, "pull", f"hf://{REPO}:Q8_0")
    assert pulled.returncode == 0, pulled.stderr
    size = default_model_path().stat().st_size
    assert f"({size / 2**20:.1f} MiB)" in pulled.stdout
    listed = [json.loads(line) for line in cli(hub_env, "list", "--json", offline=True).stdout.splitlines()]
    assert [(m["ref"], m["size"]) for m in listed] == [("(bundled)", size), (f"hf://{REPO}/{GGUF}", size)]
    _loaded(client(hub_env, f"hf://{REPO}:Q8_0", offline=True)[0], hub_env, expected_text)  # pulled: no Hub needed

    standin.reset()
    removed = cli(hub_env, "rm", f"hf://{REPO}/{GGUF}", offline=True)
    assert removed.returncode == 0 and "removed" in removed.stdout and standin.requests == []
    blobs, entries, _ = _cache_state(hub_env)
    assert blobs == [] and entries == []  # the file and its blob are gone
    assert [m["ref"] for m in map(json.loads, cli(hub_env, "list", "--json").stdout.splitlines())] == ["(bundled)"]
    again = cli(hub_env, "rm", f"hf://{REPO}:Q8_0", offline=True)
    assert again.returncode != 0 and again.stderr.startswith("edgelm: error:") and again.stderr.count("\n") == 1
    assert "nothing cached" in again.stderr
    (out,) = client(hub_env, f"hf://{REPO}/{GGUF}", offline=True)
    assert out["error"] == "DownloadError"
    bad = cli(hub_env, "pull", "hf://o/r/../x.gguf")
    assert bad.returncode != 0 and "bad file name" in bad.stderr


def test_rm_keeps_a_blob_another_revision_links_to(standin, hub_env):
    assert cli(hub_env, "pull", f"hf://{REPO}/{GGUF}").returncode == 0
    (entry,) = _cache_state(hub_env)[1]
    other = entry.parent.parent / ("0" * 40) / GGUF  # a second revision of the repo holding the same file
    other.parent.mkdir()
    other.symlink_to(os.readlink(entry))
    assert cli(hub_env, "rm", f"hf://{REPO}/{GGUF}", offline=True).returncode == 0
    blobs, entries, _ = _cache_state(hub_env)
    assert len(blobs) == 1 and entries == [other] and other.read_bytes() == default_model_path().read_bytes()
