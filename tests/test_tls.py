"""TLS on the gRPC port: a server given a certificate and key (ORCH_TLS_CERT / ORCH_TLS_KEY in the
Helm chart) speaks TLS only; a client trusting the CA gets the same tokens as over plaintext."""
from __future__ import annotations

import subprocess

import pytest

from orchestrator.client import OrchClient
from orchestrator.errors import OrchError
from tests.fixtures.serving import start_server, tiny_shards

PROMPT = [9, 33, 120, 7, 64]


def self_signed(tmp) -> tuple:
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_tls_server_serves_tls_clients_only(tmp_path):
    shards = tiny_shards(tmp_path)
    cert, key = self_signed(tmp_path)
    plain = start_server(shards)
    secure = start_server(shards, tls_cert=cert, tls_key=key)
    try:
        with OrchClient(f"127.0.0.1:{plain.port}", timeout=60) as c:
            expected = c.generate(prompt_ids=PROMPT, max_tokens=8, ignore_eos=True).token_ids
        with OrchClient(f"127.0.0.1:{secure.port}", timeout=60, tls_ca=str(cert)) as c:
            assert c.generate(prompt_ids=PROMPT, max_tokens=8, ignore_eos=True).token_ids == expected
        with pytest.raises(OrchError):
            with OrchClient(f"127.0.0.1:{secure.port}", timeout=10) as c:
                c.generate(prompt_ids=PROMPT, max_tokens=2)
    finally:
        plain.stop()
        secure.stop()
