import http.server
import json
import socket
import threading

import pytest

from shared.client import ServerUnavailable, make_client, root_url, served_models, wait_for_health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_http():
    """A real HTTP server on loopback: /health 200, /v1/models needs key 'k'."""

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                self.send_response(200)
                self.end_headers()
                return
            if self.headers.get("Authorization") != "Bearer k":
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_root_url_forms():
    assert root_url("http://h:1/v1/") == root_url("http://h:1/") == "http://h:1"


def test_health_and_models(tiny_http):
    wait_for_health(tiny_http + "/v1", timeout=5)
    assert served_models(tiny_http, "k") == [{"id": "m"}]
    with pytest.raises(PermissionError, match="GEN_SERVER_API_KEY"):
        served_models(tiny_http, "wrong")


def test_unreachable_server_names_the_fix():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable, match=r"python -m gen_server") as ei:
        wait_for_health(url, timeout=1.0, interval=0.2)
    assert url in str(ei.value)


def test_make_client_settings():
    c = make_client("http://127.0.0.1:1", "key", timeout=3, max_retries=4)
    assert str(c.base_url).rstrip("/") == "http://127.0.0.1:1/v1"
    assert c.max_retries == 4 and c.api_key == "key"
    ac = make_client("http://127.0.0.1:1/v1", None, asynchronous=True)
    assert ac.api_key == "EMPTY"
