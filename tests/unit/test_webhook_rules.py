"""Webhook rules without I/O: the SSRF guard on URLs as written, Standard Webhooks signatures
checked by the official package, the retry schedule and Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from genq.settings import Settings
from genq.webhook_signing import new_secret, signed_headers
from genq.webhook_urls import WebhookUrlError, parse_webhook_url, resolve
from workers.webhook_delivery import next_delay, parse_retry_after, retry_delays

REFUSED_URLS = [
    "http://127.0.0.1/",
    "http://2130706433/",          # 127.0.0.1, decimal
    "http://0x7f.1/",              # 127.0.0.1, hex shorthand
    "http://0177.0.0.1/",          # 127.0.0.1, octal
    "http://127.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
    "http://[::ffff:a9fe:a9fe]/",  # IPv4-mapped metadata address
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/",
    "http://100.64.0.1/",          # CGNAT
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://[fd00::1]/",           # unique local
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://0.0.0.0/",
    "http://[64:ff9b::a00:1]/",    # NAT64 of 10.0.0.1
    "http://[::127.0.0.1]/",       # IPv4-compatible loopback
    "http://[::a9fe:a9fe]/",       # IPv4-compatible metadata address
    "http://[::ffff:0:7f00:1]/",   # IPv4-translated (SIIT) loopback
    "http://[64:ff9b:1::a9fe:a9fe]/",  # local-use NAT64 of the metadata address
    "http://[fec0::1]/",           # site-local
    "http://[2001:db8::5efe:a00:1]/",  # ISATAP interface id carrying 10.0.0.1
    "ftp://example.com/",
    "file:///etc/passwd",
    "http://user:pw@example.com/",
    "http:///nohost",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_private_and_odd_urls_are_refused_as_written(url):
    with pytest.raises(WebhookUrlError):
        parse_webhook_url(url, allow_private=False)


@pytest.mark.parametrize("url", ["https://example.com/hooks?x=1", "http://8.8.8.8:8080/h",
                                 "http://localhost:9000/"])
def test_public_addresses_and_names_pass_the_submit_check(url):
    # Names are resolved and checked at send time (see the delivery tests for `localhost`).
    assert parse_webhook_url(url, allow_private=False).scheme in ("http", "https")


def test_a_refused_name_does_not_reveal_its_private_address_and_names_the_setting():
    with pytest.raises(WebhookUrlError) as refused:
        resolve("http://localhost:9000/hook", allow_private=False)
    assert "127.0.0.1" not in str(refused.value) and "::1" not in str(refused.value)
    assert "GENQ_WEBHOOK_ALLOW_PRIVATE" in str(refused.value)


def test_a_refused_literal_address_names_the_setting_that_allows_it():
    with pytest.raises(WebhookUrlError, match="GENQ_WEBHOOK_ALLOW_PRIVATE"):
        parse_webhook_url("http://127.0.0.1:8080/hook", allow_private=False)


def test_the_allow_setting_lets_private_addresses_through():
    target = parse_webhook_url("http://2130706433:8080/hook", allow_private=True)
    assert (target.host, target.port, target.path) == ("127.0.0.1", 8080, "/hook")


def test_signatures_verify_with_the_official_package_during_rotation():
    old, new = new_secret(), new_secret()
    body = '{"type":"job.succeeded"}'
    headers = signed_headers("msg_1", datetime.now(UTC), body, [new, old])

    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_retry_schedule_has_one_delay_per_attempt_with_jitter():
    settings = Settings(webhook_retry_schedule="0,5,300", webhook_retry_jitter=0.1)
    assert retry_delays(settings) == [0, 5, 300]
    assert 4.5 <= next_delay(settings, 1, None) <= 5.5
    assert next_delay(settings, 3, None) is None  # three attempts made: give up
    assert next_delay(settings, 1, retry_after=42) == 42


def test_retry_after_takes_seconds_or_an_http_date():
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after("Wed, 25 Nov 2026 12:00:30 GMT", now) == 30
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
