"""https webhooks connect to the address that was checked yet still verify the certificate
against the URL's host name (sent as SNI): a real TLS server on 127.0.0.1."""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading

import pytest

from genq.webhook_urls import WebhookTarget
from workers.webhook_delivery import post


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """An https server for `localhost` whose self-signed certificate this process trusts."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    server_names: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _socket, name, _context: server_names.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], server_names
    server.shutdown()
    server.server_close()


def test_https_uses_the_url_host_for_sni_and_certificate_checks(tls_server):
    port, server_names = tls_server

    good = post(WebhookTarget("https", "localhost", port, "/hook", "127.0.0.1"), {}, b"{}", 3)
    wrong_name = post(WebhookTarget("https", "example.org", port, "/hook", "127.0.0.1"), {},
                      b"{}", 3)

    assert good.status_code == 204 and good.is_delivered
    assert server_names[0] == "localhost"
    assert wrong_name.status_code is None and "doesn't match" in wrong_name.error
