"""Server TLS contexts and SNI choice (trioproxy.edge.tls), the 308 answer
(trioproxy.edge.redirect), and the TLS config keys with their errors."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from trioproxy.__main__ import build_parser, sources_from_args
from trioproxy.config import ConfigError
from trioproxy.config.load import load_config
from trioproxy.config.model import Config, RedirectHTTP, ServerTLS, SniCertificate
from trioproxy.edge.redirect import redirect_answer
from trioproxy.edge.tls import CertificateError, CertificateSet, TLSTerminator, server_context
from trioproxy.http.protocol import RequestHead

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def pair(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> tuple[str, str]:
    cert = ca.issue_cert(*hosts)
    certfile, keyfile = directory / f"{name}.pem", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return str(certfile), str(keyfile)


def test_server_context_is_tls12_or_newer(ca: trustme.CA, tmp_path: Path) -> None:
    context = server_context(*pair(ca, tmp_path, "a", "a.test"))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_key_of_another_certificate_is_refused(ca: trustme.CA, tmp_path: Path) -> None:
    cert, _ = pair(ca, tmp_path, "a", "a.test")
    _, other_key = pair(ca, tmp_path, "b", "b.test")
    with pytest.raises(CertificateError, match="does not match"):
        server_context(cert, other_key)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(CertificateError, match="not a PEM"):
        server_context(str(tmp_path / "junk.pem"), other_key)


def test_sni_choice(ca: trustme.CA, tmp_path: Path) -> None:
    default = pair(ca, tmp_path, "d", "d.test")
    exact = pair(ca, tmp_path, "e", "api.example.org")
    wide = pair(ca, tmp_path, "w", "*.example.org")
    narrow = pair(ca, tmp_path, "n", "*.eu.example.org")
    tls = ServerTLS(
        cert=default[0],
        key=default[1],
        sni=(
            SniCertificate(hosts=("*.example.org",), cert=wide[0], key=wide[1]),
            SniCertificate(hosts=("api.example.org",), cert=exact[0], key=exact[1]),
            SniCertificate(hosts=("*.eu.example.org",), cert=narrow[0], key=narrow[1]),
        ),
    )
    certificates = CertificateSet.load(tls)
    sni = {entry.cert: entry for entry in tls.sni}
    assert len(sni) == 3
    api = certificates.for_name("API.example.org.")
    assert api is certificates.exact["api.example.org"]
    assert certificates.for_name("x.example.org") is certificates.wildcards[1][1]
    assert certificates.for_name("a.b.eu.example.org") is certificates.wildcards[0][1]
    assert certificates.wildcards[0][0] == ".eu.example.org"  # longest first
    for name in (None, "", "example.org", "other.test"):
        assert certificates.for_name(name) is certificates.default
    terminator = TLSTerminator(tls)
    before = terminator.certificates
    terminator.reload(tls)
    assert terminator.certificates is not before


def head(target: bytes, host: bytes | None) -> RequestHead:
    return RequestHead(b"GET", target, [(b"host", host)] if host is not None else [])


def test_redirect_answer() -> None:
    answer = redirect_answer(head(b"/a?b=1", b"Example.com:8080"), 8443)
    assert answer.status == 308
    assert (b"location", b"https://example.com:8443/a?b=1") in answer.headers
    assert (b"location", b"https://[::1]/x") in redirect_answer(
        head(b"/x", b"[::1]:80"), 443
    ).headers
    assert redirect_answer(head(b"/x", None), 443).status == 400
    assert redirect_answer(head(b"/x", b"a b"), 443).status == 400
    assert redirect_answer(head(b"*", b"a"), 443).status == 400


def load(cwd: Path, text: str, *argv: str) -> Config:
    (cwd / "t.toml").write_text(text + '[upstreams.default]\nservers = ["http://127.0.0.1:1"]\n')
    parser = build_parser()
    args = parser.parse_args(["--config", "t.toml", *argv])
    return load_config(sources_from_args(parser, args, {}, str(cwd)))


def errors(cwd: Path, text: str, *argv: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(cwd, text, *argv)
    return list(info.value.errors)


def test_tls_keys(ca: trustme.CA, tmp_path: Path) -> None:
    pair(ca, tmp_path, "site", "site.test")
    pair(ca, tmp_path, "api", "api.test")
    config = load(
        tmp_path,
        '[server.tls]\ncert = "site.pem"\nkey = "site.key"\nredirect_http = 8080\n'
        '[[server.tls.sni]]\nhosts = ["API.test"]\ncert = "api.pem"\nkey = "api.key"\n',
    )
    tls = config.server.tls
    assert tls is not None
    assert tls.cert == str(tmp_path / "site.pem")
    assert tls.sni == (
        SniCertificate(
            hosts=("api.test",), cert=str(tmp_path / "api.pem"), key=str(tmp_path / "api.key")
        ),
    )
    assert tls.redirect_http == RedirectHTTP(port=8080)
    flags = load(tmp_path, "", "--certfile", "site.pem", "--keyfile", "site.key")
    assert flags.server.tls is not None and flags.server.tls.redirect_http is None
    host = load(
        tmp_path,
        '[server]\ntls = { cert = "site.pem", key = "site.key", redirect_http = "[::]:80" }\n',
    )
    assert host.server.tls is not None
    assert host.server.tls.redirect_http == RedirectHTTP(host="::", port=80)


def test_tls_errors_name_file_key_and_value(ca: trustme.CA, tmp_path: Path) -> None:
    pair(ca, tmp_path, "site", "site.test")
    pair(ca, tmp_path, "other", "other.test")
    assert errors(tmp_path, "", "--certfile", "site.pem") == [
        '--certfile: needs both "cert" and "key" (--certfile and --keyfile)'
    ]
    assert errors(tmp_path, '[server.tls]\ncert = "site.pem"\nkey = "other.key"\n') == [
        't.toml: server.tls.cert: "site.pem": the key does not match the certificate'
    ]
    assert errors(tmp_path, '[server.tls]\ncert = "nope.pem"\nkey = "site.key"\n') == [
        't.toml: server.tls.cert: cannot read "nope.pem": No such file or directory'
    ]
    assert sorted(
        errors(
            tmp_path,
            '[server.tls]\ncert = "site.pem"\nkey = "site.key"\nredirect_http = "x"\n'
            '[[server.tls.sni]]\nhosts = ["a b"]\ncert = "gone.pem"\n',
        )
    ) == [
        't.toml: server.tls.redirect_http: must be a port or "host:port", got "x"',
        't.toml: server.tls.sni[0].hosts[0]: must be a host name or "*.domain", got "a b"',
        't.toml: server.tls.sni[0]: needs "key"',
    ]
    assert errors(
        tmp_path, '[upstreams.x]\nservers = ["https://a:1"]\ntls = { cert = "site.pem" }\n'
    ) == ['t.toml: upstreams.x.tls.cert: a client certificate needs both "cert" and "key"']
