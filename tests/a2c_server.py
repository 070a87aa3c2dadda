"""Run acme2certifier's WSGI application over TLS: a2c_server.py HOST PORT CERT KEY.

Started by ca_servers.Acme2Certifier with `python -I` (so that tests/acme.py cannot shadow the
`acme` package acme2certifier's dependencies bring) and ACME_SRV_CONFIGFILE set. wsgiref
serves one request at a time, which is all the tests need; every URL the server hands out is
https:// because the environment says the request came over TLS.
"""

import ssl
import sys
from wsgiref.simple_server import make_server

from acme2certifier.share import acme2certifier_wsgi as a2c


def over_tls(environ, start_response):
    environ["wsgi.url_scheme"], environ["HTTPS"] = "https", "on"
    return a2c.application(environ, start_response)


def main(host, port, certfile, keyfile):
    server = make_server(host, int(port), over_tls, handler_class=a2c.get_handler_cls())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:5])
