"""The server's request limits, on a real server process (tests/server_fixtures.py's tiny model,
the session's shared server): oversized bodies, content types, Host names, CORS, the error shape of
Starlette's own errors, sampling values that overflowed, and fields a decoding would ignore.
Every refused case is followed by a normal request, which must still succeed.
"""

import json
import socket
import threading

import pytest

from tests.server_fixtures import MAX_BATCH, MAX_PROMPT, PROMPTS, put_api

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


BIG = 52_000_000  # bytes


def still_serves(client):
    assert put_api(client, prompts=PROMPTS[:1], tokens_to_generate=2, top_k=1)["tokens"][0][:3] == [5, 17, 3]


def error_of(reply, status):
    assert reply.status_code == status, (reply.status_code, reply.text)
    body = reply.json()
    # the server's shape, not FastAPI's {"detail": ...}; the top-level message is Megatron-LM's
    assert set(body) == {"error", "message"} and body["message"] == body["error"]["message"], body
    return body["error"]


def host_port(server):
    host, port = server.url[len("http://") :].rsplit(":", 1)
    return host, int(port)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def raw_request(server, head: bytes, timeout=15) -> socket.socket:
    sock = socket.create_connection(host_port(server), timeout=timeout)
    sock.sendall(head)
    return sock


def read_status(sock) -> tuple:
    """(status, JSON body) of the reply on `sock`."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_oversized_bodies_get_413_before_they_are_read(server, client):
    """A declared 52 MB body is refused on its Content-Length, with the body still unsent; a
    52 MB chunked body is refused once it passes the limit. /health answers meanwhile, and the
    server's memory does not grow by the body."""
    rss_before = rss_mib(server.proc.pid)
    head = (
        f"PUT /api HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {BIG}\r\n\r\n"
    ).encode()
    # The body never comes: a server that waited for it would time out this socket's read.
    sock = raw_request(server, head + b'{"prompts": [')
    status, body = read_status(sock)
    assert status == 413 and body["error"]["message"].startswith(
        f"body: {BIG} bytes exceed the server's --max-request-bytes"
    ), body
    assert client.get("/health").status_code == 200  # while that connection is still open
    sock.close()

    sock = raw_request(
        server,
        b"PUT /api HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    piece = b'"5 17 3", ' * 6500  # 65 KB

    def send_all():
        try:
            sock.sendall(b'%x\r\n{"prompts": [\r\n' % len(b'{"prompts": ['))
            for _ in range(BIG // len(piece)):
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        except OSError:
            pass  # the server closed the connection after its 413

    sender = threading.Thread(target=send_all)
    sender.start()
    status, body = read_status(sock)
    health = client.get("/health", timeout=5)
    sender.join(timeout=60)
    sock.close()
    assert status == 413 and "--max-request-bytes" in body["error"]["message"], body
    assert health.status_code == 200
    assert rss_mib(server.proc.pid) - rss_before < 200
    still_serves(client)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_bodies_must_be_declared_json(client, content_type):
    """A web page can POST text/plain or a form anywhere without a CORS preflight; not JSON."""
    body = json.dumps({"prompts": PROMPTS[:1], "tokens_to_generate": 2, "top_k": 1}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    for method, path in (("PUT", "/api"), ("POST", "/v1/completions")):
        error = error_of(client.request(method, path, content=body, headers=headers), 415)
        assert error["param"] == "Content-Type" and error["message"].startswith("Content-Type: "), error
        assert "application/json" in error["message"]
    reply = client.put("/api", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert reply.status_code == 200, reply.text
    still_serves(client)


def test_foreign_hosts_are_refused_and_no_cors_headers_by_default(server, client):
    """DNS rebinding: a page of evil.example that resolves to 127.0.0.1 sends Host: evil.example."""
    _, port = host_port(server)
    error = error_of(client.get("/health", headers={"Host": f"evil.example:{port}"}), 400)
    assert error["param"] == "Host" and error["message"].startswith("Host: 'evil.example:"), error
    assert "--allowed-hosts" in error["message"]
    error_of(client.put("/api", json={"prompts": PROMPTS[:1]}, headers={"Host": "evil.example"}), 400)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host

    origin = {"Origin": "http://evil.example"}
    for reply in (
        client.get("/health", headers=origin),
        client.put("/api", json={"prompts": PROMPTS[:1], "tokens_to_generate": 1}, headers=origin),
        client.options("/api", headers={**origin, "Access-Control-Request-Method": "PUT"}),
    ):
        assert not [h for h in reply.headers if h.lower().startswith("access-control-")], dict(reply.headers)
    still_serves(client)


def test_starlette_errors_use_the_server_error_shape(client):
    error = error_of(client.get("/no/such/page"), 404)
    assert error["message"].startswith("GET /no/such/page: no such endpoint") and "PUT /api" in error["message"]
    error = error_of(client.delete("/api"), 405)
    assert error["message"].startswith("DELETE /api: method not allowed"), error
    error_of(client.get("/api"), 405)
    for raw in (b'{"prompts": ["5 17 3"], ', b"\xff\xfe{}", b"", b"nan"):
        error = error_of(client.put("/api", content=raw, headers={"Content-Type": "application/json"}), 400)
        assert error["param"] == "body" and error["message"].startswith("body: "), (raw, error)
    still_serves(client)


OVERFLOWING = [  # (path, body, field): values that reached the sampler and gave a 500
    ("/api", {"prompts": PROMPTS[:1], "tokens_to_generate": 2, "temperature": 1e-300}, "temperature"),
    ("/api", {"prompts": PROMPTS[:1], "tokens_to_generate": 2, "top_p": 1e-300}, "top_p"),
    ("/api", {"prompts": PROMPTS[:1], "tokens_to_generate": 2, "random_seed": 2**64}, "random_seed"),
    ("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 1e-300}, "temperature"),
    ("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, "top_p": 1e-300}, "top_p"),
    ("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, "seed": 2**64}, "seed"),
]


@pytest.mark.parametrize("path,body,field", OVERFLOWING, ids=[f"{p}-{f}" for p, _, f in OVERFLOWING])
def test_sampling_values_that_overflow_are_refused(client, path, body, field):
    reply = client.request("PUT" if path == "/api" else "POST", path, json=body)
    error = error_of(reply, 422)
    assert error["param"] == field and error["message"].startswith(f"{field}: "), error
    still_serves(client)


IGNORED = [  # (path, body, field): fields the decoding would not read
    ("/api", {"prompts": PROMPTS[:1], "tokens_to_generate": 2, "top_k": 1, "exit_layers": [1]}, "exit_layers"),
    (
        "/api",
        {"prompts": PROMPTS[:1], "tokens_to_generate": 2, "top_k": 1, "use_early_exit": False, "exit_layers": [2]},
        "exit_layers",
    ),
    ("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0, "exit_layers": [1]}, "exit_layers"),
    (
        "/api",
        {
            "prompts": PROMPTS[:1],
            "tokens_to_generate": 2,
            "top_k": 1,
            "use_early_exit": True,
            "kv_strategy": "pipeline",
        },
        "kv_strategy",
    ),
    (
        "/v1/completions",
        {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0, "use_early_exit": True, "kv_strategy": "pipeline"},
        "kv_strategy",
    ),
]


@pytest.mark.parametrize("path,body,field", IGNORED, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(IGNORED)])
def test_fields_the_decoding_would_ignore_are_refused(client, path, body, field):
    reply = client.request("PUT" if path == "/api" else "POST", path, json=body)
    error = error_of(reply, 400)
    assert error["param"] == field and error["message"].startswith(f"{field}: "), error
    assert put_api(client, prompts=PROMPTS[:1], tokens_to_generate=2, top_k=1, exit_layers=[])  # [] means all: fine
    still_serves(client)


def test_host_cors_and_size_flags():
    """The launch flags, through the policy they build, on the app in this process."""
    from concurrent.futures import Future

    from fastapi.testclient import TestClient

    from megatron.early_exit.errors import ConfigError
    from megatron.early_exit.inference import GenerationResult
    from megatron.early_exit.server.app import Service, build_app
    from megatron.early_exit.server.jobs import ModelLimits
    from megatron.early_exit.server.launch import build_policy, parse_args
    from megatron.early_exit.tokenizers import NullTokenizer

    class Echo:
        queued, busy, served = 0, False, 0

        def submit(self, job):
            future = Future()
            rows = len(job.prompts)
            future.set_result(GenerationResult([[1]] * rows, [[4]] * rows, [[0.0]] * rows, num_layers=4))
            return future

    limits = ModelLimits("tiny", 128, 4, (1, 2), 64, MAX_BATCH, MAX_PROMPT)

    def app_client(*flags, host="localhost"):
        policy = build_policy(parse_args(["--load", "ckpt", *flags]), limits)
        return TestClient(build_app(Service(Echo(), NullTokenizer(100), limits), policy), base_url=f"http://{host}")

    body = {"prompts": ["1 2"], "tokens_to_generate": 1}
    assert app_client(host="gpu-box.lan").get("/health").status_code == 400
    assert (
        app_client("--allowed-hosts", "gpu-box.lan", host="gpu-box.lan:5000").put("/api", json=body).status_code == 200
    )
    assert app_client("--host", "10.1.2.3", host="10.1.2.3:5000").get("/health").status_code == 200
    assert app_client("--allowed-hosts", "*", host="anything.example").get("/health").status_code == 200

    opened = app_client("--cors-origins", "http://notebook.lan:8888")
    preflight = opened.options(
        "/api",
        headers={
            "Origin": "http://notebook.lan:8888",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://notebook.lan:8888"
    refused = opened.put(
        "/api", content=b"x" * 10, headers={"Origin": "http://notebook.lan:8888", "Content-Type": "text/plain"}
    )
    assert refused.status_code == 415 and refused.headers["access-control-allow-origin"] == "http://notebook.lan:8888"
    other = opened.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers

    small = app_client("--max-request-bytes", "100")
    assert small.put("/api", json=body).status_code == 200
    assert small.put("/api", json={**body, "prompts": ["1 2 3 4 5 6 7 8 9"] * 8}).status_code == 413
    default = build_policy(parse_args(["--load", "ckpt"]), limits).max_request_bytes
    assert default == 1 << 20
    big = ModelLimits("big", 128, 4, (), 32768, 16, 32767)
    assert build_policy(parse_args(["--load", "ckpt"]), big).max_request_bytes >= 16 * 32767 * 16
    with pytest.raises(ConfigError, match="--max-request-bytes must be >= 1"):
        parse_args(["--load", "ckpt", "--max-request-bytes", "0"])
