"""A local stand-in for the parts of the Hugging Face Hub HTTP API that uploads use.

It answers create-repo, whoami, validate-yaml, preupload, commit (NDJSON) and
the Git LFS flow that huggingface_hub follows for large files: preupload says
"lfs" for a file of `lfs_threshold` bytes or more, the LFS batch endpoint hands
out an upload and a verify action, the upload is a PUT of the raw bytes, and the
commit names the file by its sha256 (an "lfsFile" entry) instead of carrying it.
Like the hub, it refuses a request with any token but its own with HTTP 401.
It keeps what arrives and records every request, so a test can check what a
script pushed and how.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Lookups that some huggingface_hub releases make on the side (huggingface_hub 1.x asks for
# agent harnesses); the client carries on after a 404, so they are not unknown requests.
OPTIONAL_LOOKUPS = ("/api/agent-harnesses",)
# The hub keeps files of 10 MB and more in LFS storage; smaller ones go into the commit itself.
LFS_THRESHOLD = 10_000_000
# What the hub answers (body and X-Error-Message header) to a token it does not know.
BAD_TOKEN = "Invalid credentials in Authorization header"


class HubStandIn:
    """The hub on 127.0.0.1: `repos` maps repo -> path -> bytes, whichever way a file came.

    `lfs_files` maps repo -> path -> (sha256, size) for files committed as LFS
    pointers, `lfs_objects` maps sha256 -> bytes received by LFS upload, and
    `refused` lists the requests answered 401.
    """

    def __init__(self, token: str = "secret", lfs_threshold: int = LFS_THRESHOLD):
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, dict[str, bytes]] = {}
        self.lfs_files: dict[str, dict[str, tuple[str, int]]] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.commits: list[tuple[str, str]] = []  # (repo, message)
        self.requests: list[str] = []
        self.refused: list[str] = []
        self.unknown: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _refuse_a_bad_token(self) -> bool:
                """Answer 401, as the hub does, unless the request carries the stand-in's token."""
                if self.headers.get("Authorization") == f"Bearer {stand_in.token}":
                    return False
                stand_in.refused.append(f"{self.command} {self.path}")
                self._send(401, {"error": BAD_TOKEN}, {"X-Error-Message": BAD_TOKEN})
                return True

            def do_GET(self):
                stand_in.requests.append(f"GET {self.path}")
                if self.path.startswith("/api/whoami"):
                    if self._refuse_a_bad_token():
                        return
                    return self._send(200, {"name": "tester", "type": "user", "orgs": [],
                                            "auth": {"accessToken": {"role": "write"}}})
                if not self.path.startswith(OPTIONAL_LOOKUPS):
                    stand_in.unknown.append(f"GET {self.path}")
                self._send(404, {"error": "not in the stand-in"})

            def do_PUT(self):
                """The LFS upload action: the raw bytes, kept if they hash to the oid in the URL."""
                stand_in.requests.append(f"PUT {self.path}")
                body = self._body()
                match = re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.path)
                if not match:
                    stand_in.unknown.append(f"PUT {self.path}")
                    return self._send(404, {"error": "not in the stand-in"})
                if hashlib.sha256(body).hexdigest() != match["oid"]:
                    return self._send(400, {"error": "the upload does not hash to its oid"})
                stand_in.lfs_objects[match["oid"]] = body
                self._send(200, {})

            def do_POST(self):
                stand_in.requests.append(f"POST {self.path}")
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/validate-yaml":  # the hub checks a README.md's front matter
                    return self._send(200, {"errors": [], "warnings": []})
                if self._refuse_a_bad_token():
                    return
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo = "/".join(filter(None, (request.get("organization"), request["name"])))
                    stand_in.repos.setdefault(repo, {})
                    return self._send(200, {"url": f"{stand_in.url}/{repo}", "name": repo})
                if re.fullmatch(r"/[^/]+/[^/]+\.git/info/lfs/objects/batch", path):
                    return self._lfs_batch(json.loads(body))
                if path.startswith("/lfs-verify/"):
                    request = json.loads(body)
                    stored = stand_in.lfs_objects.get(request["oid"])
                    if stored is None or len(stored) != request["size"]:
                        return self._send(404, {"error": "no such LFS object"})
                    return self._send(200, {})
                match = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<verb>preupload|commit)/(?P<rev>[^/]+)",
                                     path)
                if match and match["verb"] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "shouldIgnore": False,
                         "uploadMode": "lfs" if f["size"] >= stand_in.lfs_threshold else "regular"}
                        for f in files]})
                if match and match["verb"] == "commit":
                    return self._commit(match["repo"], body)
                stand_in.unknown.append(f"POST {self.path}")
                self._send(404, {"error": "not in the stand-in"})

            def _lfs_batch(self, request: dict) -> None:
                """Upload (and verify) actions for the objects not stored yet, over the basic transfer."""
                objects = []
                for entry in request["objects"]:
                    answer = {"oid": entry["oid"], "size": entry["size"], "authenticated": True}
                    if entry["oid"] not in stand_in.lfs_objects:
                        answer["actions"] = {"upload": {"href": f"{stand_in.url}/lfs-upload/{entry['oid']}"},
                                             "verify": {"href": f"{stand_in.url}/lfs-verify/{entry['oid']}"}}
                    objects.append(answer)
                self._send(200, {"transfer": "basic", "objects": objects})

            def _commit(self, repo: str, body: bytes) -> None:
                """Apply one NDJSON commit; an LFS pointer must name an uploaded object of that size."""
                message, files, lfs_files = "", {}, {}
                for line in body.decode().splitlines():
                    entry = json.loads(line)
                    if entry["key"] == "header":
                        message = entry["value"]["summary"]
                    elif entry["key"] == "file":
                        files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                    elif entry["key"] == "lfsFile":
                        oid, size = entry["value"]["oid"], entry["value"]["size"]
                        stored = stand_in.lfs_objects.get(oid)
                        if entry["value"]["algo"] != "sha256" or stored is None or len(stored) != size:
                            return self._send(400, {"error": f"no LFS object {oid} of {size} bytes"})
                        files[entry["value"]["path"]] = stored
                        lfs_files[entry["value"]["path"]] = (oid, size)
                stand_in.repos.setdefault(repo, {}).update(files)
                stand_in.lfs_files.setdefault(repo, {}).update(lfs_files)
                stand_in.commits.append((repo, message))
                self._send(200, {"commitUrl": f"{stand_in.url}/{repo}/commit/{'0' * 40}",
                                 "commitOid": "0" * 40, "success": True, "pullRequestUrl": None})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
