"""A local stand-in for the parts of the Hugging Face Hub HTTP API that uploads use.

It answers create-repo, whoami, validate-yaml, preupload (every file as a
regular, non-LFS upload) and commit (NDJSON with base64 file contents), keeps what arrives,
and records every request, so a test can check what a script pushed.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Lookups that some huggingface_hub releases make on the side (huggingface_hub 1.x asks for
# agent harnesses); the client carries on after a 404, so they are not unknown requests.
OPTIONAL_LOOKUPS = ("/api/agent-harnesses",)


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[tuple[str, str]] = []  # (repo, message)
        self.requests: list[str] = []
        self.unknown: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                stand_in.requests.append(f"GET {self.path}")
                if self.path.startswith("/api/whoami"):
                    return self._send(200, {"name": "tester", "type": "user", "orgs": [],
                                            "auth": {"accessToken": {"role": "write"}}})
                if not self.path.startswith(OPTIONAL_LOOKUPS):
                    stand_in.unknown.append(f"GET {self.path}")
                self._send(404, {"error": "not in the stand-in"})

            def do_POST(self):
                stand_in.requests.append(f"POST {self.path}")
                body = self._body()
                if self.path == "/api/validate-yaml":  # the hub checks a README.md's front matter
                    return self._send(200, {"errors": [], "warnings": []})
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    repo = "/".join(filter(None, (request.get("organization"), request["name"])))
                    stand_in.repos.setdefault(repo, {})
                    return self._send(200, {"url": f"{stand_in.url}/{repo}", "name": repo})
                match = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<verb>preupload|commit)/(?P<rev>[^/?]+)",
                                     self.path.split("?")[0])
                if match and match["verb"] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if match and match["verb"] == "commit":
                    repo, message = match["repo"], ""
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "header":
                            message = entry["value"]["summary"]
                        elif entry["key"] == "file":
                            stand_in.repos.setdefault(repo, {})[entry["value"]["path"]] = base64.b64decode(
                                entry["value"]["content"])
                    stand_in.commits.append((repo, message))
                    return self._send(200, {"commitUrl": f"{stand_in.url}/{repo}/commit/{'0' * 40}",
                                            "commitOid": "0" * 40, "success": True, "pullRequestUrl": None})
                stand_in.unknown.append(f"POST {self.path}")
                self._send(404, {"error": "not in the stand-in"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
