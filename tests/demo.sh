#!/bin/sh
# make demo: fetch a chain from a local TLS server, as a user would.
#
#   sh tests/demo.sh [BUILD_DIR] [PYTHON]     (defaults: build/demo python3)
#
# Generates a test PKI with tests/make_certs.py, serves the EC leaf with two
# intermediates from `openssl s_server` on 127.0.0.1 (a real non-Python server,
# no network needed), runs certgrab.py against it twice (chain to stdout, then
# --out-dir), shows the files it wrote, and stops the server.
set -eu

DEMO=${1:-build/demo}
PYTHON=${2:-python3}
NAME=www.example.test

if [ -t 1 ]; then BOLD=$(printf '\033[1m'); PLAIN=$(printf '\033[0m'); else BOLD=; PLAIN=; fi
say() { printf '\n%s$ %s%s\n' "$BOLD" "$*" "$PLAIN"; }
run() { say "$*"; "$@"; }

command -v openssl >/dev/null || { echo "demo: needs openssl (apt-get install openssl)" >&2; exit 1; }
rm -rf "$DEMO"
mkdir -p "$DEMO"
echo "demo: generating a test PKI in $DEMO/certs"
"$PYTHON" tests/make_certs.py "$DEMO/certs" >"$DEMO/make_certs.log"
CERTS=$DEMO/certs/ec2

# A free port: bind to port 0, read it back. s_server binds it a moment later.
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
openssl s_server -quiet -accept "127.0.0.1:$PORT" -naccept 10 \
    -cert "$CERTS/cert.pem" -key "$CERTS/key.pem" -cert_chain "$CERTS/chain.pem" \
    </dev/null >"$DEMO/s_server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT INT TERM
"$PYTHON" - "$PORT" <<'PY'
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("demo: openssl s_server did not start; see s_server.log")
        time.sleep(0.05)
PY
echo "demo: openssl s_server (pid $SERVER) serves $CERTS/cert.pem + chain.pem on 127.0.0.1:$PORT"

run "$PYTHON" certgrab.py "127.0.0.1:$PORT" -n "$NAME" --cafile "$CERTS/root.pem"
run "$PYTHON" certgrab.py "127.0.0.1:$PORT" -n "$NAME" --cafile "$CERTS/root.pem" -v --out-dir "$DEMO/out"
run ls -l "$DEMO/out"
for f in cert chain fullchain; do
    say "openssl crl2pkcs7 -nocrl -certfile $DEMO/out/$f.pem | openssl pkcs7 -print_certs -noout"
    openssl crl2pkcs7 -nocrl -certfile "$DEMO/out/$f.pem" | openssl pkcs7 -print_certs -noout | sed '/^$/d'
done
if cmp -s "$DEMO/out/cert.pem" "$CERTS/cert.pem" && cmp -s "$DEMO/out/chain.pem" "$CERTS/chain.pem"; then
    echo
    echo "demo: cert.pem and chain.pem match what the server was given"
else
    echo "demo: the files differ from what the server was given" >&2
    exit 1
fi
