"""A loopback stand-in for the Hugging Face Hub, speaking the HTTP subset huggingface_hub 2.4 sends to push
(`HfApi.whoami`, `create_repo`, `repo_exists`, `create_commit`) and to read (`model_info`, `list_repo_tree`,
`get_paths_info`, `hf_hub_download`).

Routes (checked against the installed client: tests/test_hub.py checks a push uses only the push routes):

| route name      | request                                                        |
|-----------------|----------------------------------------------------------------|
| `whoami`        | `GET /api/whoami-v2`                                           |
| `create_repo`   | `POST /api/repos/create` (409 when it exists)                  |
| `repo_info`     | `GET /api/models/{ns}/{name}[/revision/{rev}]` (card license)  |
| `validate_yaml` | `POST /api/validate-yaml`                                      |
| `preupload`     | `POST /api/models/{ns}/{name}/preupload/{rev}`                 |
| `commit`        | `POST /api/models/{ns}/{name}/commit/{rev}` (ndjson)           |
| `tree`          | `GET /api/models/{ns}/{name}/tree/{rev}` (every file)          |
| `paths_info`    | `POST /api/models/{ns}/{name}/paths-info/{rev}` (form `paths`) |
| `resolve`       | `GET` or `HEAD /{ns}/{name}/resolve/{rev}/{path}` (the bytes)  |

Every file is answered as a `regular` upload, so its bytes travel base64 inside the commit body (no LFS/Xet);
a repo's files are what `add_repo` gave it plus what its commits added. Reads follow the Hub: a private repo
is readable by its owner only (404 `RepoNotFound` to anyone else), a gated one (401 `GatedRepo`) by its owner
and the accounts that accepted its conditions. The server records every request, the bearer token it carried
(None when absent) and each commit with its decoded files.
Failure injection: `hub.fail["commit"] = 500` answers that route with a 500, `= "drop"` closes the connection
without an answer (what a network failure looks like to the client).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

WRITE_ROLES = ("write", "admin", "contributor")


@dataclass
class Account:
    """A token the hub knows: whose it is and what it may do."""

    user: str
    role: str
    can_write: bool
    orgs: tuple[str, ...]

    @property
    def namespaces(self) -> set[str]:
        """Where this account may create and write repos: the user's own and their orgs'."""
        return {self.user, *self.orgs}


@dataclass(frozen=True)
class SeenRequest:
    """One request as the hub received it (`token` is the bearer token, None when absent)."""

    method: str
    path: str
    route: str
    token: str | None


@dataclass
class Commit:
    """One commit the hub accepted; `files` maps path in repo to the decoded bytes."""

    repo_id: str
    summary: str
    description: str
    files: dict[str, bytes]
    token: str
    oid: str


@dataclass
class Repo:
    """A model repo: its visibility, its files (path in repo -> bytes), card license and commits.

    A `gated` repo is readable only by its owner and the users in `accepted` (who accepted its conditions).
    """

    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    license: str | None = None
    gated: bool = False
    accepted: set[str] = field(default_factory=set)
    commits: list[Commit] = field(default_factory=list)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def head(self) -> str:
        """The commit id of the repo's last commit (zeros before any)."""
        return self.commits[-1].oid if self.commits else "0" * 40


@dataclass(frozen=True)
class Reply:
    """What the hub sends back: the body and its headers (a file's bytes, or JSON: `_json`)."""

    data: bytes
    headers: Mapping[str, str]


class HubError(Exception):
    """An HTTP error answer: status, message, the X-Error-Code header the client reads, extra JSON fields."""

    def __init__(self, status: int, message: str, error_code: str | None = None, **extra: str):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.extra = extra


class DropConnection(Exception):
    """Close the connection without answering."""


class FakeHub:
    """The hub's state and behaviour; `start()` serves it on 127.0.0.1 at `self.url`.

    `env` holds the variables a process needs to use it (`HF_ENDPOINT`, `HF_HUB_OFFLINE=0`), once started.
    """

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.repos: dict[str, Repo] = {}
        self.requests: list[SeenRequest] = []
        self.commits: list[Commit] = []
        self.validated_cards: list[str] = []
        self.fail: dict[str, int | str] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""
        self.env: dict[str, str] = {}

    def add_user(
        self, user: str, token: str, *, role: str = "write", can_write: bool | None = None, orgs: Sequence[str] = ()
    ) -> None:
        """Register `token` for `user`; whoami reports `role`; `can_write` defaults to a write-ish role."""
        writable = role in WRITE_ROLES if can_write is None else can_write
        self.accounts[token] = Account(user=user, role=role, can_write=writable, orgs=tuple(orgs))

    def add_repo(
        self,
        repo_id: str,
        *,
        private: bool = False,
        files: Mapping[str, bytes] | None = None,
        license: str | None = None,
        gated: bool = False,
        accepted: Sequence[str] = (),
    ) -> None:
        """A repo that exists before the test, owned by its namespace, holding `files` (path -> bytes); a
        `gated` one is readable by its owner and the users in `accepted`."""
        self.repos[repo_id] = Repo(
            repo_id=repo_id,
            private=private,
            files=dict(files or {}),
            license=license,
            gated=gated,
            accepted=set(accepted),
        )

    def tokens_seen(self, *routes: str) -> set[str]:
        """Bearer tokens the hub received, on the given routes only when some are named."""
        return {r.token for r in self.requests if r.token is not None and (not routes or r.route in routes)}

    def routes_seen(self) -> list[str]:
        return [r.route for r in self.requests]

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.env.update(HF_ENDPOINT=self.url, HF_HUB_OFFLINE="0")
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- request handling -------------------------------------------------------------------------

    def handle(self, method: str, path: str, token: str | None, body: bytes) -> object:
        """Record and answer one request with a JSON-able value or a `Reply`; raises HubError or
        DropConnection."""
        route, params = _match_route(method, path)
        with self._lock:
            self.requests.append(SeenRequest(method, path, route, token))
        failure = self.fail.get(route)
        if failure == "drop":
            raise DropConnection(route)
        if failure is not None:
            raise HubError(int(failure), f"injected failure on {route}")
        if route == "unknown":
            raise HubError(HTTPStatus.NOT_FOUND, f"no such route: {method} {path}")
        return getattr(self, "_" + route)(token, body, **params)

    def _account(self, token: str | None) -> Account:
        if token is None or token not in self.accounts:
            raise HubError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")
        return self.accounts[token]

    def _check_write(self, token: str | None, repo_id: str) -> Repo:
        account = self._account(token)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and repo.owner not in account.namespaces):
            raise HubError(HTTPStatus.NOT_FOUND, "Repository not found", "RepoNotFound")
        if not account.can_write or repo.owner not in account.namespaces:
            raise HubError(HTTPStatus.FORBIDDEN, f"You don't have write access to {repo_id}")
        return repo

    def _check_read(self, token: str | None, ns: str, name: str) -> Repo:
        repo = self.repos.get(f"{ns}/{name}")
        account = self.accounts.get(token) if token is not None else None
        if repo is None or (repo.private and (account is None or repo.owner not in account.namespaces)):
            raise HubError(HTTPStatus.NOT_FOUND, "Repository not found", "RepoNotFound")
        if repo.gated and (account is None or not {repo.owner, *repo.accepted} & account.namespaces):
            raise HubError(HTTPStatus.UNAUTHORIZED, "Access to this repo is restricted", "GatedRepo")
        return repo

    def _whoami(self, token, body):
        account = self._account(token)
        return {
            "type": "user",
            "name": account.user,
            "fullname": account.user.title(),
            "avatarUrl": "/avatars/none.svg",
            "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in account.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": account.role}},
        }

    def _create_repo(self, token, body):
        account = self._account(token)
        request = json.loads(body)
        namespace = request.get("organization") or account.user
        repo_id = f"{namespace}/{request['name']}"
        if not account.can_write or namespace not in account.namespaces:
            raise HubError(HTTPStatus.FORBIDDEN, f'You don\'t have the rights to create a model under "{namespace}"')
        with self._lock:
            if repo_id in self.repos:
                raise HubError(HTTPStatus.CONFLICT, "You already created this model repo", url=f"{self.url}/{repo_id}")
            self.repos[repo_id] = Repo(repo_id=repo_id, private=request.get("visibility") == "private")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _repo_info(self, token, body, ns, name, rev=None):
        repo = self._check_read(token, ns, name)
        return {
            "id": repo.repo_id,
            "private": repo.private,
            "sha": repo.head,
            "siblings": [{"rfilename": f} for f in sorted(repo.files)],
            "cardData": {"license": repo.license} if repo.license else {},
        }

    def _tree(self, token, body, ns, name, rev):
        repo = self._check_read(token, ns, name)
        return [_entry(path, data) for path, data in sorted(repo.files.items())]

    def _paths_info(self, token, body, ns, name, rev):
        repo = self._check_read(token, ns, name)
        asked = urllib.parse.parse_qs(body.decode()).get("paths", [])
        return [_entry(path, repo.files[path]) for path in asked if path in repo.files]

    def _resolve(self, token, body, ns, name, rev, path):
        repo = self._check_read(token, ns, name)
        data = repo.files.get(urllib.parse.unquote(path))
        if data is None:
            raise HubError(HTTPStatus.NOT_FOUND, "Entry not found", "EntryNotFound")
        return Reply(data, {"X-Repo-Commit": repo.head, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})

    def _validate_yaml(self, token, body):
        content = json.loads(body)["content"]
        self.validated_cards.append(content)
        front = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            yaml.safe_load(front.group(1) if front else "")
        except yaml.YAMLError as err:
            raise HubError(HTTPStatus.BAD_REQUEST, f"Invalid YAML: {err}") from err
        return {"errors": [], "warnings": []}

    def _preupload(self, token, body, ns, name, rev):
        self._check_write(token, f"{ns}/{name}")
        files = json.loads(body)["files"]
        return {
            "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
        }

    def _commit(self, token, body, ns, name, rev):
        repo = self._check_write(token, f"{ns}/{name}")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {
            line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"
        }
        oid = hashlib.sha1(body).hexdigest()
        commit = Commit(repo.repo_id, header["summary"], header.get("description", ""), files, token, oid)
        with self._lock:
            repo.commits.append(commit)
            repo.files.update(files)
            self.commits.append(commit)
        return {
            "commitOid": oid,
            "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}",
            "pullRequestUrl": None,
        }


def _entry(path: str, data: bytes) -> dict:
    """A file as the tree and paths-info routes list it."""
    return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


_NAME = r"(?P<ns>[\w.-]+)/(?P<name>[\w.-]+)"
# (methods, path pattern, route name)
ROUTES = (
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("GET", re.compile(rf"/api/models/{_NAME}(?:/revision/(?P<rev>[^/]+))?"), "repo_info"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_NAME}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_NAME}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_NAME}/tree/(?P<rev>[^/]+)"), "tree"),
    ("POST", re.compile(rf"/api/models/{_NAME}/paths-info/(?P<rev>[^/]+)"), "paths_info"),
    ("GET HEAD", re.compile(rf"/{_NAME}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
)


def _match_route(method: str, path: str) -> tuple[str, dict[str, str]]:
    """The route name and its path parameters; ("unknown", {}) when no route matches."""
    for route_methods, pattern, route in ROUTES:
        match = pattern.fullmatch(path.split("?")[0])
        if match and method in route_methods.split():
            return route, {k: v for k, v in match.groupdict().items() if v is not None}
    return "unknown", {}


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:
            """Quiet: the hub's record is `hub.requests`."""

        def do_GET(self) -> None:
            self._serve()

        def do_HEAD(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            body = self._read_body()
            authorization = self.headers.get("Authorization", "")
            token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
            try:
                answer = hub.handle(self.command, self.path, token, body)
            except DropConnection:
                self.close_connection = True
                return
            except HubError as err:
                headers = {"X-Error-Message": str(err)}
                if err.error_code:
                    headers["X-Error-Code"] = err.error_code
                self._reply(err.status, _json({"error": str(err), **err.extra}, headers))
                return
            self._reply(HTTPStatus.OK, answer if isinstance(answer, Reply) else _json(answer))

        def _reply(self, status: int, answer: Reply) -> None:
            """Send `answer` (its headers only to a HEAD request)."""
            self.send_response(status)
            for key, value in {**answer.headers, "Content-Length": str(len(answer.data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.data)

    return Handler


def _json(value: object, headers: Mapping[str, str] | None = None) -> Reply:
    """A JSON reply."""
    return Reply(json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})
