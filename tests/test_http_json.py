"""Issue 21: certgrab's own bounded HTTP/1.1 GET and JSON reader (minimal hosts have neither
http.client nor json).

    1. the GET against real servers (Python's http.server; nginx in test_crl.py): bodies by
       Content-Length and chunked, statuses, redirects (followed up to 3, same scheme only)
    2. hostile servers: garbage, slow drip, oversized, lying Content-Length, endless chunks,
       endless headers; every one ends within the deadline and the size bound
    3. URLs: what split_url accepts and refuses
    4. the JSON reader against the json module on the same inputs: valid, invalid, fuzzed;
       and its bounds (depth, number length, size)
"""

import json
import os
import random
import time

import pytest

from ca_servers import FileServer, RawHttpServer
from servers import GarbageServer, closed_port

DEADLINE = 5.0  # seconds for one GET here


@pytest.fixture
def files(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.bin").write_bytes(bytes(range(256)) * 1000)
    server = FileServer(tmp_path).start()
    yield server
    server.stop()


def get(certgrab, url, limit=1 << 20, deadline=DEADLINE):
    return certgrab.http_get(url, limit, time.monotonic() + deadline, 0)


def failure(certgrab, url, **kwargs):
    with pytest.raises(certgrab.FetchError) as caught:
        get(certgrab, url, **kwargs)
    return caught.value


# ---------------------------------------------------------------- 1. real servers

def test_a_file_from_http_server(certgrab, files):
    response = get(certgrab, files.url("dir/a.bin"))
    assert response.status == 200 and response.body == bytes(range(256)) * 1000
    assert response.headers["content-length"] == "256000"


def test_a_missing_file_is_its_status(certgrab, files):
    response = get(certgrab, files.url("dir/nothing"))
    assert response.status == 404
    with pytest.raises(certgrab.CaError) as caught:
        certgrab.expect_ok(response)
    assert caught.value.status == 404 and "HTTP status 404" in str(caught.value)


def test_a_redirect_is_followed(certgrab, files):
    """http.server answers a directory without its slash with 301 to the slash."""
    response = get(certgrab, files.url("dir"))
    assert response.status == 200 and response.url.endswith("/dir/")
    assert files.paths == ["/dir", "/dir/"]


def test_a_chunked_body(certgrab, started):
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (b"hello ", b"chunked", b"!"))
    server = started(RawHttpServer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   + body + b"0\r\nX-Trailer: 1\r\n\r\n", "hold"))
    assert get(certgrab, server.url()).body == b"hello chunked!"


def test_an_interim_answer_is_skipped_and_no_length_reads_to_the_end(certgrab, started):
    server = started(RawHttpServer(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                                   b"HTTP/1.0 200 OK\r\n\r\nuntil the end", "close"))
    response = get(certgrab, server.url())
    assert (response.status, response.body) == (200, b"until the end")


def test_the_request_is_plain_http_1_1(certgrab, started):
    seen = []

    class Recording(RawHttpServer):
        def handle(self, conn):
            seen.append(self.read_some(conn))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    server = started(Recording())
    get(certgrab, "http://127.0.0.1:%d/a/b.crl?x=1#frag" % server.port)
    request = seen[0].decode()
    assert request.startswith("GET /a/b.crl?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)
    assert "Connection: close\r\n" in request and "Accept-Encoding: identity\r\n" in request


@pytest.mark.parametrize("location,words", [
    ("https://127.0.0.1/x", "not a usable http:// URL: another scheme"),
    ("ftp://127.0.0.1/x", "another scheme"),
    ("http://user@127.0.0.1/x", "a user name in it"),
])
def test_a_redirect_elsewhere_is_refused(certgrab, started, location, words):
    server = started(RawHttpServer(b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0"
                                   b"\r\n\r\n" % location.encode(), "close"))
    assert words in str(failure(certgrab, server.url()))


def test_redirects_are_followed_three_times_at_most(certgrab, started):
    server = started(RawHttpServer(b"HTTP/1.1 301 Moved\r\nLocation: /again\r\n"
                                   b"Content-Length: 0\r\n\r\n", "close"))
    assert "more than 3 redirects" in str(failure(certgrab, server.url()))
    assert server.requests == 4


# ---------------------------------------------------------------- 2. hostile servers

HOSTILE = [
    ("garbage", lambda: GarbageServer(), "not an HTTP answer"),
    ("oversized", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n",
                                        "hold"), "more than the 1048576 allowed"),
    ("lying-length", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\nab",
                                           "close"), "after 2 of 500 bytes"),
    ("two-lengths", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                          b"Content-Length: 6\r\n\r\nabcdef"),
     "a malformed Content-Length"),
    ("length-and-chunked", lambda: RawHttpServer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
     "framed in a way"),
    ("endless-chunks", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
                                             b"\r\n\r\n", "endless-chunks"), "larger than"),
    ("endless-body", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\n\r\n", "endless-body"),
     "larger than"),
    ("endless-headers", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 5000,
                                              "hold"), "more than 100 header lines"),
    ("long-line", lambda: RawHttpServer(b"HTTP/1.1 200 " + b"O" * 20000, "hold"),
     "a line longer than 8192 bytes"),
    ("bad-chunk", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                        b"\r\nzz\r\n", "hold"), "a malformed chunk size"),
    ("huge-chunk", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                                         b"\r\nfffffffff\r\n", "hold"), "a malformed chunk size"),
    ("compressed", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                                         b"Content-Length: 3\r\n\r\nabc"), "a compressed answer"),
    ("silent", lambda: RawHttpServer(b"", "hold"), "timed out"),
    ("drip", lambda: RawHttpServer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100,
                                   "drip", interval=0.05), "timed out"),
]


@pytest.mark.parametrize("make,words", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_servers_end_in_an_error_within_the_bounds(certgrab, started, make, words):
    server = started(make())
    start = time.monotonic()
    error = failure(certgrab, "http://%s/x.crl" % server.address, deadline=2.0)
    assert words in str(error), str(error)
    assert time.monotonic() - start < 2.0 + 1.0


def test_a_refused_connection_says_so(certgrab):
    with closed_port() as port:
        error = failure(certgrab, "http://127.0.0.1:%d/x.crl" % port)
    assert "cannot connect to port %d" % port in str(error)


# ---------------------------------------------------------------- 3. URLs

@pytest.mark.parametrize("url,parts", [
    ("http://e6.c.lencr.org/41.crl", ("e6.c.lencr.org", 80, "/41.crl")),
    ("http://127.0.0.1:8080", ("127.0.0.1", 8080, "/")),
    ("http://[::1]:81/a?b", ("::1", 81, "/a?b")),
    ("http://example.test?q", ("example.test", 80, "/?q")),
    ("HTTP://Example.Test/x#f", ("Example.Test", 80, "/x")),
])
def test_urls_certgrab_reads(certgrab, url, parts):
    assert certgrab.split_url(url, "http") == parts


@pytest.mark.parametrize("url", [
    "https://example.test/", "ldap://example.test/", "http://", "http://a b/", "http://x:0/",
    "http://x:65536/", "http://u:p@x/", "http://[::1/", "http://::1/", "http://-x-/",
    "http://x/" + "a" * 3000, "http://x/\u00e9", "http://x/\x00",
])
def test_urls_certgrab_refuses(certgrab, url):
    with pytest.raises(certgrab.CaError):
        certgrab.split_url(url, "http")


# ---------------------------------------------------------------- 4. JSON against json

VALID = [
    '{"suggestedWindow": {"start": "2025-01-02T04:00:00Z", "end": "2025-01-03T04:00:00Z"}, '
    '"explanationURL": "https://acme.example.com/docs/ari"}',
    '{"newNonce": "https://x/n", "meta": {"termsOfService": "t", "profiles": {"a": "b"}}}',
    "[]", "{}", "0", "-0", "1.5e-3", "-12.25E+2", "123456789012345678901234567890", "true",
    "false", "null", '"\\u00e9\\ud83d\\ude00\\n\\t\\"\\\\\\/"', '"\\ud800"', '"\\udc00x"',
    '"\\ud800\\u0041"', ' \t\n\r[1 , 2 ,{ "a" : [ ] }]\n', '{"a": 1, "a": 2}', '"\u00e9\u20ac"',
    "[1e400]", '"\x7f"',
]
INVALID = [
    "", " ", "[", "]", "{", "[1,]", "[,1]", '{"a":1,}', '{"a" 1}', "{a:1}", "01", "-", "1.",
    ".5", "1e", "+1", "NaN", "Infinity", "-Infinity", "tru", "nul", "[1 2]", '"\x01"', '"\\x"',
    '"\\u12"', '"\\uZZZZ"', '"abc', "[1]]", "1 2", "\ufeff1", "'a'", '{"a":}', "[-]",
    '{"a":1 "b":2}', "\u0663",
]


def mine(certgrab, text):
    try:
        return certgrab.parse_json(text.encode("utf-8", "surrogatepass"))
    except certgrab.ParseError as exc:
        return ("error", str(exc))


def theirs(text):
    def refuse(constant):
        raise ValueError(constant)
    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError as exc:      # JSONDecodeError is one
        return ("error", str(exc))


def same(a, b):
    """Equal values of the same types all the way down (True is not 1, 1 is not 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or a != a and b != b


@pytest.mark.parametrize("text", VALID)
def test_valid_json_reads_as_json_reads_it(certgrab, text):
    assert same(mine(certgrab, text), theirs(text)), text


@pytest.mark.parametrize("text", INVALID)
def test_invalid_json_is_refused_as_json_refuses_it(certgrab, text):
    assert theirs(text)[0] == "error"
    assert mine(certgrab, text)[0] == "error"


def test_fuzzed_json_agrees_with_json(certgrab, fuzz_cases):
    """Mutations of valid documents: where json (strict: no NaN) reads one, certgrab reads
    the same value; where json refuses, certgrab refuses. Inputs beyond certgrab's bounds
    are refused with the bound's words."""
    rng = random.Random(21)
    alphabet = '{}[]",:.-+eE0123456789 \\u\t\nabtrfnlsx\u00e9\x01'
    agreed = 0
    for _ in range(fuzz_cases):
        text = list(rng.choice(VALID))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(text) + 1)
            action = rng.random()
            if action < 0.4 and text:
                del text[min(at, len(text) - 1)]
            elif action < 0.8:
                text.insert(at, rng.choice(alphabet))
            else:
                text[at:at] = text[rng.randrange(len(text) or 1):][:rng.randint(1, 8)]
        text = "".join(text)
        got, want = mine(certgrab, text), theirs(text)
        if isinstance(got, tuple) and ("nested more than" in got[1] or "longer than" in got[1]):
            continue
        assert same(got, want) or got[0] == want[0] == "error", (text, got, want)
        agreed += 1
    assert agreed > fuzz_cases * 0.9


def test_json_bounds(certgrab):
    deep = "[" * 17 + "]" * 17
    assert json.loads(deep) and "nested more than 16 deep" in mine(certgrab, deep)[1]
    assert mine(certgrab, "[" * 16 + "]" * 16) == [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]
    long_number = "1" * 41
    assert "longer than 40" in mine(certgrab, long_number)[1]
    with pytest.raises(certgrab.ParseError):
        certgrab.parse_json(b'"' + b"x" * (64 << 10) + b'"')
    with pytest.raises(certgrab.ParseError):
        certgrab.parse_json(b'"\xff"')                  # not UTF-8


def test_no_module_json_is_imported(certgrab):
    """The reader is the module's own: certgrab never imports json, http or urllib."""
    source = open(os.path.join(os.path.dirname(certgrab.__file__), "certgrab.py")).read()
    for module in ("json", "http.client", "urllib"):
        assert "import %s" % module not in source
