"""The server under abuse: every out-of-range number is a 400 naming its field, a huge request is refused
from its headers, /health answers while abusive requests arrive, slow clients are cut off, and a request
that runs too long is stopped."""

import json
import socket
import threading
import time

import pytest
from test_serve import NAME, Server, error_of

from budgetthink.formats import get_format
from budgetthink.serve import create_app

FMT = get_format("tinyzero")
VALUES = [-1, 0, 2**31, 2**63, 10**30, float("nan"), float("inf"), True, "16"]
# which of VALUES each numeric field accepts (from the schema's bounds: api.py)
VALID = {"max_tokens": [], "max_completion_tokens": [], "temperature": [0], "top_p": [], "top_k": [0], "n": [],
         "seed": [0, 2**31], "max_thinking_tokens": [0], "min_thinking_tokens": [0], "thinking_extensions": [0]}
BASES = {"/v1/chat/completions": {"model": NAME, "messages": [{"role": "user", "content": "1+1="}]},
         "/v1/completions": {"model": NAME, "prompt": "1+1="}}


@pytest.fixture(scope="module")
def server(engine):
    with Server(create_app(engine, NAME, FMT, max_batch=16, header_timeout=0.5, body_timeout=0.5)) as s:
        yield s


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from budgetthink import engine as engines

    return engines.load_engine(str(tiny_model_dir), backend="torch")


@pytest.mark.parametrize("path", list(BASES))
def test_every_numeric_field_swept_is_200_or_400_naming_it(server, path):
    for field, valid in VALID.items():
        for value in VALUES:
            body = {**BASES[path], "max_tokens": 2, "temperature": 0, field: value}
            r = server.http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            case = f"{field}={value!r}"
            if any(value == v and type(value) is type(v) for v in valid):
                assert r.status_code == 200, (case, r.text)
            else:
                err = error_of(r, 400)
                assert err["param"] == field and field in err["message"], (case, err)
    for field in ("stream", "stream_options"):  # booleans are strict too: 1 is not true
        value = 1 if field == "stream" else {"include_usage": 1}
        err = error_of(server.http.post(path, json={**BASES[path], "max_tokens": 2, field: value}), 400)
        assert err["param"].startswith(field)


def raw(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def headers(path: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{size}\r\n".encode()


def status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ")[1]) if data.startswith(b"HTTP/1.1 ") else 0


def huge_request(server) -> tuple[int, float]:
    """A chat request of 1,024 messages of 1 MB each, as a client sends it: the headers, then the body's start."""
    msg = json.dumps({"role": "user", "content": "x" * 1_000_000})
    length = len('{"model": "tiny", "messages": [') + 1024 * len(msg) + 1023 * 2 + len("]}")
    with raw(server) as sock:
        t0 = time.perf_counter()
        sock.sendall(headers("/v1/chat/completions", length) + b'{"model": "tiny", "messages": [' + msg[:65536].encode())
        return status_of(sock), time.perf_counter() - t0


def test_a_1024_x_1mb_request_is_refused_from_its_headers(server):
    status, seconds = huge_request(server)
    assert status == 413 and seconds < 0.1, (status, seconds)
    # without a Content-Length (chunked) the body is read only up to the limit, then refused
    limit = server.app.state.config.max_body_bytes
    with raw(server) as sock:
        sock.sendall(headers("/v1/completions", None))
        chunk = b"x" * 65536
        try:
            for _ in range(limit // len(chunk) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # the server answered and closed while we were still sending
            pass
        assert status_of(sock) == 413


def test_prompt_text_limits_come_before_tokenising(server):
    config = server.app.state.config
    half = config.max_prompt_chars // 2 + 1  # each prompt under the limit, the two together over it
    err = error_of(server.http.post("/v1/completions", json={"model": NAME, "prompt": ["x" * half] * 2}), 400)
    assert err["param"] == "prompt" and err["code"] == "prompt_too_long"
    err = error_of(server.http.post("/v1/completions", json={"model": NAME, "prompt": "x" * (config.max_prompt_chars + 1)}), 400)
    assert err["param"] == "prompt" and err["code"] == "prompt_too_long"
    messages = [{"role": "user", "content": "x"}] * (config.max_messages + 1)
    err = error_of(server.http.post("/v1/chat/completions", json={"model": NAME, "messages": messages}), 400)
    assert err["param"] == "messages" and err["code"] == "too_many_messages"
    # under the character limit but over the context once tokenised
    err = error_of(server.http.post("/v1/completions", json={"model": NAME, "prompt": "x" * 2000}), 400)
    assert err["code"] == "context_length_exceeded"


def test_health_stays_responsive_during_abusive_requests(server):
    config = server.app.state.config
    stop = threading.Event()
    near_limit = json.dumps({"model": NAME, "prompt": ["7" * (config.max_prompt_chars // 16)] * 16, "max_tokens": 1})
    many_messages = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x"}] * 5000})  # under the body limit

    def abuse(kind):
        while not stop.is_set():
            try:
                if kind == "huge":
                    huge_request(server)
                elif kind == "slow":  # a slowloris socket: a few header bytes, then silence
                    with raw(server) as sock:
                        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost")
                        sock.recv(10)
                else:
                    with raw(server) as sock:
                        body = (near_limit if kind == "tokens" else many_messages).encode()
                        sock.sendall(headers("/v1/completions" if kind == "tokens" else "/v1/chat/completions",
                                             len(body)) + body)
                        status_of(sock)
            except OSError:
                pass

    threads = [threading.Thread(target=abuse, args=(k,), daemon=True) for k in ("huge", "slow", "slow", "tokens",
                                                                                 "messages")]
    for t in threads:
        t.start()
    import gc

    # The server runs inside the test process: a full collection there also walks every object earlier tests
    # left (measured: 0.35-0.45 s pauses after test_serve.py). Freezing them leaves the server's own pauses.
    gc.collect()
    gc.freeze()
    try:
        time.sleep(0.3)
        waits = []
        for _ in range(40):
            t0 = time.perf_counter()
            assert server.http.get("/health").status_code == 200
            waits.append(time.perf_counter() - t0)
            time.sleep(0.02)
    finally:
        stop.set()
        gc.unfreeze()
        for t in threads:
            t.join(10)
    assert max(waits) < 0.1, sorted(waits)[-5:]


def test_slow_clients_are_cut_off(server):
    config = server.app.state.config
    silent = [raw(server) for _ in range(20)]  # open and send nothing
    dripping = raw(server)  # headers one byte at a time
    t0 = time.perf_counter()
    for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n":
        try:
            dripping.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.05)
        if time.perf_counter() - t0 > config.header_timeout + 1:
            break
    for sock in [*silent, dripping]:
        sock.settimeout(config.header_timeout + 2)
        assert sock.recv(10) == b""  # closed by the server
        sock.close()
    # the headers in time, the body too slow: 408
    with raw(server) as sock:
        sock.sendall(headers("/v1/completions", 100) + b'{"model": ')
        assert status_of(sock) == 408


def test_a_request_past_its_timeout_is_504(engine):
    with Server(create_app(engine, NAME, FMT, request_timeout=0.05)) as s:
        body = {"model": NAME, "prompt": "1", "max_tokens": 600, "min_thinking_tokens": 590, "temperature": 1.0}
        err = error_of(s.http.post("/v1/completions", json=body), 504)
        assert err["code"] == "request_timeout"
        r = s.http.post("/v1/completions", json={**body, "stream": True})
        assert r.status_code == 200 and '"request_timeout"' in r.text and r.text.rstrip().endswith("[DONE]")
