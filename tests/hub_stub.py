"""
A local stand-in for the Hugging Face Hub HTTP API: enough of it for `Dataset.push_to_hub`,
`DatasetCard.push_to_hub`, `HfApi.upload_file` and `load_dataset(repo_id)` (huggingface_hub 2.4, datasets 5.2).

The server listens on 127.0.0.1 on a free port and keeps repositories as git-like commits: each commit maps paths
to blobs, a branch points at its latest commit, and a commit replaces, adds and deletes files relative to its
parent. File contents are stored by sha256 in a folder. Uploads go through the legacy LFS protocol, so clients must
run with `HF_HUB_DISABLE_XET=1`.

Routes:
    POST /api/repos/create                                   create a repository (409 when it exists)
    GET  /api/{type}s/{repo_id}[/revision/{rev}]             repository info (id, sha, siblings, cardData)
    POST /api/validate-yaml                                  validate the YAML block of a card (400 when invalid)
    POST /api/{type}s/{repo_id}/preupload/{rev}              upload mode per file: "lfs" for binary files
    POST /{prefix}{repo_id}.git/info/lfs/objects/batch       LFS batch: where to PUT each missing object
    PUT  /lfs-objects/{sha256}                               LFS object upload (checked against its sha256)
    POST /api/{type}s/{repo_id}/commit/{rev}                 NDJSON commit (honours `parentCommit`, 412 if stale)
    GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]          folder listing (404 `EntryNotFound` if missing)
    POST /api/{type}s/{repo_id}/paths-info/{rev}             information on given paths
    GET|HEAD /{prefix}{repo_id}/resolve/{rev}/{path}         file download, with `Range` support

Write routes require `Authorization: Bearer <token>` with the token given to the server. The server logs only
method, path and status of each request (never headers), in `HubStub.requests`.

Example:
    ```python
    with HubStub(tmp_path / "hub", token="hf_dummy") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        ...
    ```
"""

import base64
import datetime
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


REPO_TYPES = ("model", "dataset", "space")
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".parquet", ".arrow", ".png", ".jpg", ".jpeg", ".safetensors", ".bin", ".npy", ".zip", ".gz")
INITIAL_ATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"
YAML_BLOCK = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: its content's sha256 and size, and whether the Hub keeps it in LFS."""

    sha256: str
    size: int
    lfs: bool
    blob_oid: str


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repository:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


def yaml_block_error(content: str) -> str | None:
    """The reason the Hub would reject the YAML block of a card, or None when it is valid (or absent)."""
    match = YAML_BLOCK.match(content)
    if match is None:
        return None
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return f"Invalid YAML: {error}"
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "The YAML block must be a mapping."
    for key in ("tags", "task_categories", "task_ids", "source_datasets", "size_categories", "language", "license"):
        value = metadata.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))
        ):
            return f'"{key}" must be a string or a list of strings, got {value!r}.'
    for key in ("configs", "dataset_info"):
        value = metadata.get(key)
        if value is not None and not isinstance(value, (list, dict)):
            return f'"{key}" must be a list or a mapping, got {value!r}.'
    return None


class StubError(Exception):
    """An HTTP error response: status, message and optional `X-Error-Code` header."""

    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


class HubStub:
    """The repositories and blobs of the stub Hub, and the HTTP server that serves them."""

    def __init__(self, storage: Path, token: str):
        self.storage = Path(storage)
        self.objects = self.storage / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repositories: dict[tuple[str, str], Repository] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # Server lifecycle.

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubStub":
        stub = self

        class Handler(StubRequestHandler):
            hub = stub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="hub-stub", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=10)
            self.server = None

    def __enter__(self) -> "HubStub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # Storage.

    def store_object(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.objects / sha256
        if not path.exists():
            path.write_bytes(data)
        return sha256

    def has_object(self, sha256: str) -> bool:
        return (self.objects / sha256).is_file()

    def read_object(self, sha256: str) -> bytes:
        return (self.objects / sha256).read_bytes()

    def repository(self, repo_type: str, repo_id: str) -> Repository:
        repository = self.repositories.get((repo_type, repo_id))
        if repository is None:
            raise StubError(404, f"Repository {repo_type}/{repo_id} not found.", "RepoNotFound")
        return repository

    def resolve_commit(self, repository: Repository, revision: str) -> Commit:
        revision = unquote(revision)
        if revision in repository.branches:
            return repository.commits[repository.branches[revision]]
        if revision in repository.commits:
            return repository.commits[revision]
        matches = [oid for oid in repository.commits if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return repository.commits[matches[0]]
        raise StubError(404, f"Revision {revision!r} not found in {repository.repo_id}.", "RevisionNotFound")

    def create_repository(self, repo_type: str, repo_id: str, private: bool) -> Repository:
        with self.lock:
            if (repo_type, repo_id) in self.repositories:
                raise StubError(409, f"You already created this {repo_type} repo: {repo_id}.")
            repository = Repository(repo_type=repo_type, repo_id=repo_id, private=private)
            self.repositories[(repo_type, repo_id)] = repository
            attributes = StoredFile(
                sha256=self.store_object(INITIAL_ATTRIBUTES),
                size=len(INITIAL_ATTRIBUTES),
                lfs=False,
                blob_oid=git_blob_oid(INITIAL_ATTRIBUTES),
            )
            self.add_commit(repository, "main", "initial commit", {".gitattributes": attributes})
            return repository

    def add_commit(self, repository: Repository, branch: str, title: str, files: dict[str, StoredFile]) -> Commit:
        parent = repository.branches.get(branch)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        blobs = {path: stored.blob_oid for path, stored in sorted(files.items())}
        listing = json.dumps({"parent": parent, "title": title, "date": date, "files": blobs})
        oid = hashlib.sha1(listing.encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, title=title, date=date, files=dict(files))
        repository.commits[oid] = commit
        repository.branches[branch] = oid
        return commit

    def apply_commit(self, repository: Repository, revision: str, lines: list[dict]) -> Commit:
        """Build a commit on branch `revision` from the NDJSON lines of a commit request."""
        with self.lock:
            branch = unquote(revision)
            if branch not in repository.branches:
                raise StubError(404, f"Branch {branch!r} not found in {repository.repo_id}.", "RevisionNotFound")
            head = repository.commits[repository.branches[branch]]
            if not lines or lines[0].get("key") != "header":
                raise StubError(400, "A commit payload starts with a header line.")
            header = lines[0]["value"]
            parent = header.get("parentCommit")
            if parent is not None and not head.oid.startswith(parent):
                raise StubError(412, f"Parent commit {parent} is not the head {head.oid} of {branch}.")

            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise StubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}.")
                    data = base64.b64decode(value["content"])
                    files[path] = StoredFile(self.store_object(data), len(data), False, git_blob_oid(data))
                elif key == "lfsFile":
                    sha256 = value["oid"]
                    if value.get("algo", "sha256") != "sha256" or not self.has_object(sha256):
                        raise StubError(400, f"LFS object {sha256} of {path} was not uploaded.")
                    size = int(value["size"])
                    files[path] = StoredFile(sha256, size, True, git_blob_oid(lfs_pointer(sha256, size)))
                elif key == "deletedFile":
                    if path not in files:
                        raise StubError(404, f"Cannot delete {path}: not found.", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [name for name in files if name.startswith(prefix)]:
                        del files[name]
                else:
                    raise StubError(400, f"Unsupported commit operation {key!r}.")
            return self.add_commit(repository, branch, header.get("summary") or "commit", files)

    # Listings.

    def entry(self, commit: Commit, path: str) -> dict | None:
        """Tree entry of `path` in `commit` in the Hub's JSON form, or None when the path does not exist."""
        stored = commit.files.get(path)
        if stored is not None:
            entry = {"type": "file", "oid": stored.blob_oid, "size": stored.size, "path": path}
            if stored.lfs:
                pointer = lfs_pointer(stored.sha256, stored.size)
                entry["lfs"] = {"oid": stored.sha256, "size": stored.size, "pointerSize": len(pointer)}
            return entry
        prefix = path.rstrip("/") + "/"
        if any(name.startswith(prefix) for name in commit.files):
            oid = hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()
            return {"type": "directory", "oid": oid, "size": 0, "path": path}
        return None

    def list_tree(self, commit: Commit, folder: str, recursive: bool) -> list[dict]:
        folder = folder.strip("/")
        if folder and self.entry(commit, folder) is None:
            raise StubError(404, f"Folder {folder!r} not found.", "EntryNotFound")
        prefix = folder + "/" if folder else ""
        paths = set()
        for name in commit.files:
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            if recursive:
                for depth in range(1, len(parts) + 1):
                    paths.add(prefix + "/".join(parts[:depth]))
            else:
                paths.add(prefix + parts[0])
        return [self.entry(commit, path) for path in sorted(paths)]


class StubRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler for `HubStub`; `hub` is set on a subclass per server."""

    hub: HubStub
    protocol_version = "HTTP/1.1"

    # Quiet: the stub keeps its own request log without headers, so no token reaches any output.
    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    # Plumbing.

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub.requests.append((self.command, urlsplit(self.path).path, status))

    def send_json(self, value, status: int = 200, headers=None):
        self.send(status, json.dumps(value).encode(), headers=headers)

    def require_token(self):
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise StubError(401, "Invalid credentials in Authorization header.")

    def dispatch(self, method: str):
        body = self.read_body() if method in ("POST", "PUT") else b""
        url = urlsplit(self.path)
        segments = url.path.strip("/").split("/")
        query = parse_qs(url.query)
        try:
            self.route(method, segments, query, body)
        except StubError as error:
            headers = {"X-Error-Message": error.message}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            self.send_json({"error": error.message}, status=error.status, headers=headers)
        except Exception as error:  # a bug in the stub: respond 500 so that the client fails loudly
            self.send_json({"error": f"stub failure: {type(error).__name__}: {error}"}, status=500)

    def route(self, method: str, segments: list[str], query: dict, body: bytes):
        hub = self.hub
        if segments[:1] == ["api"]:
            rest = segments[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self.create_repo(json.loads(body or b"{}"))
            if method == "GET" and rest == ["agent-harnesses"]:
                return self.send_json({"standardEnvVars": [], "harnesses": {}})
            if method == "POST" and rest == ["validate-yaml"]:
                return self.validate_yaml(json.loads(body or b"{}"))
            if len(rest) >= 3 and rest[0].rstrip("s") in REPO_TYPES:
                repo_type = rest[0][:-1]
                repo_id = f"{unquote(rest[1])}/{unquote(rest[2])}"
                action = rest[3:]
                repository = hub.repository(repo_type, repo_id)
                if method == "GET" and not action:
                    return self.repo_info(repository, "main")
                if method == "GET" and len(action) == 2 and action[0] == "revision":
                    return self.repo_info(repository, action[1])
                if method == "POST" and len(action) == 2 and action[0] == "preupload":
                    self.require_token()
                    return self.preupload(json.loads(body))
                if method == "POST" and len(action) == 2 and action[0] == "commit":
                    self.require_token()
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    commit = hub.apply_commit(repository, action[1], lines)
                    url = f"{hub.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}/commit/{commit.oid}"
                    return self.send_json({"commitUrl": url, "commitOid": commit.oid, "pullRequestUrl": None})
                if method == "GET" and len(action) >= 2 and action[0] == "tree":
                    commit = hub.resolve_commit(repository, action[1])
                    folder = "/".join(unquote(part) for part in action[2:])
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    return self.send_json(hub.list_tree(commit, folder, recursive))
                if method == "POST" and len(action) == 2 and action[0] == "paths-info":
                    commit = hub.resolve_commit(repository, action[1])
                    form = parse_qs(body.decode())
                    entries = [hub.entry(commit, path.strip("/")) for path in form.get("paths", [])]
                    return self.send_json([entry for entry in entries if entry is not None])
            raise StubError(404, f"No stub route for {method} /{'/'.join(segments)}.")

        if method == "PUT" and len(segments) == 2 and segments[0] == "lfs-objects":
            return self.upload_lfs_object(segments[1], body)

        repo_type = "model"
        if segments[0] in ("datasets", "spaces"):
            repo_type, segments = segments[0][:-1], segments[1:]
        if method == "POST" and len(segments) == 6 and segments[1].endswith(".git") and segments[2:] == [
            "info", "lfs", "objects", "batch"
        ]:
            self.require_token()
            hub.repository(repo_type, f"{segments[0]}/{segments[1][:-4]}")
            return self.lfs_batch(json.loads(body))
        if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
            repository = hub.repository(repo_type, f"{unquote(segments[0])}/{unquote(segments[1])}")
            commit = hub.resolve_commit(repository, segments[3])
            return self.resolve(commit, unquote("/".join(segments[4:])))
        raise StubError(404, f"No stub route for {method} /{'/'.join(segments)}.")

    # Routes.

    def create_repo(self, payload: dict):
        self.require_token()
        repo_type = payload.get("type") or "model"
        name = payload.get("name")
        namespace = payload.get("organization") or "stub-user"
        if repo_type not in REPO_TYPES or not name:
            raise StubError(400, f"Invalid repository request {payload}.")
        repo_id = f"{namespace}/{name}"
        self.hub.create_repository(repo_type, repo_id, private=payload.get("visibility") == "private")
        url = f"{self.hub.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def repo_info(self, repository: Repository, revision: str):
        commit = self.hub.resolve_commit(repository, revision)
        card_data = None
        readme = commit.files.get("README.md")
        if readme is not None:
            match = YAML_BLOCK.match(self.hub.read_object(readme.sha256).decode("utf-8"))
            card_data = yaml.safe_load(match.group(1)) if match else None
        siblings = [{"rfilename": path, "size": stored.size} for path, stored in sorted(commit.files.items())]
        self.send_json(
            {
                "id": repository.repo_id,
                "author": repository.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repository.private,
                "lastModified": commit.date,
                "siblings": siblings,
                "cardData": card_data,
                "tags": [],
            }
        )

    def validate_yaml(self, payload: dict):
        """Reject a card whose YAML block does not parse to a mapping, or whose known fields have wrong types."""
        error = yaml_block_error(payload.get("content", ""))
        if error is not None:
            return self.send_json({"errors": [{"message": error}], "warnings": []}, status=400)
        self.send_json({"errors": [], "warnings": []})

    def preupload(self, payload: dict):
        files = []
        for entry in payload.get("files", []):
            path = entry["path"]
            sample = base64.b64decode(entry.get("sample", ""))
            binary = path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample
            files.append({"path": path, "uploadMode": "lfs" if binary else "regular", "shouldIgnore": False})
        self.send_json({"files": files, "commitOid": None})

    def lfs_batch(self, payload: dict):
        if payload.get("operation") != "upload":
            raise StubError(400, f"Unsupported LFS operation {payload.get('operation')!r}.")
        objects = []
        for item in payload.get("objects", []):
            answer = {"oid": item["oid"], "size": item["size"]}
            if not self.hub.has_object(item["oid"]):
                answer["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-objects/{item['oid']}"}}
            objects.append(answer)
        self.send(
            200, json.dumps({"transfer": "basic", "objects": objects}).encode(), "application/vnd.git-lfs+json"
        )

    def upload_lfs_object(self, sha256: str, body: bytes):
        if hashlib.sha256(body).hexdigest() != sha256:
            raise StubError(400, f"The uploaded content does not match its sha256 {sha256}.")
        self.hub.store_object(body)
        self.send(200)

    def resolve(self, commit: Commit, path: str):
        stored = commit.files.get(path)
        if stored is None:
            raise StubError(404, f"Entry {path!r} not found.", "EntryNotFound")
        data = self.hub.read_object(stored.sha256)
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers["ETag"] = f'"{stored.sha256}"'
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(stored.size)
        else:
            headers["ETag"] = f'"{stored.blob_oid}"'

        byte_range = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", byte_range or "")
        if match and self.command == "GET":
            start_text, end_text = match.groups()
            if start_text:
                start = int(start_text)
                end = min(int(end_text), len(data) - 1) if end_text else len(data) - 1
            else:
                start, end = max(len(data) - int(end_text), 0), len(data) - 1
            if start >= len(data):
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self.send(416, b"", "application/octet-stream", headers)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self.send(206, data[start : end + 1], "application/octet-stream", headers)
        self.send(200, data, "application/octet-stream", headers)
