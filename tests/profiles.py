"""Chains made like Let's Encrypt's 2026 profiles, dated so that "now" is where a test wants.

    make_profile_chain(directory, lifetime, left, ip="127.0.0.1") -> directory

writes root.pem, cert.pem, chain.pem, fullchain.pem and key.pem under directory: a P-384 root
and a P-384 intermediate (the Generation Y hierarchy), and a leaf like the `tlsserver` and
`shortlived` profiles issue: an empty subject (no CN), no subject key identifier, its only
name an IP-address SAN (marked critical, as RFC 5280 asks of a certificate without a subject).
The leaf's lifetime is `lifetime` seconds, of which `left` remain now.

pyca/cryptography from the test venv makes them: openssl ca cannot date a certificate to the
second relative to now as simply.
"""

import datetime
import ipaddress
import os
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from make_certs import DAY

CA_YEARS = 5 * 365 * DAY  # seconds either side of now that the root and intermediate cover
CERTBOT_SHORT = 10 * DAY  # seconds; certbot 4 renews at half left under this lifetime, else a third


def renewal_left(lifetime):
    """Seconds left when certbot 4 renews a certificate of this lifetime."""
    return lifetime / 2.0 if lifetime < CERTBOT_SHORT else lifetime / 3.0


def _when(epoch):
    return datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=epoch)


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "certgrab tests Y"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, issuer, public_key, signing_key, not_before, not_after, ca,
                 extensions):
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(_when(not_before)).not_valid_after(_when(not_after))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA384())


def _ca_extensions(key, issuer_key=None):
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False)
    extensions = [(usage, True),
                  (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)]
    if issuer_key is not None:
        extensions.append((x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), False))
    return extensions


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def make_profile_chain(directory, lifetime, left, ip="127.0.0.1", now=None):
    """The chain in directory (created); see the module docstring."""
    now = time.time() if now is None else now
    os.makedirs(str(directory), exist_ok=True)
    root_key, inter_key = ec.generate_private_key(ec.SECP384R1()), \
        ec.generate_private_key(ec.SECP384R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate(_name("certgrab test root YE"), _name("certgrab test root YE"),
                        root_key.public_key(), root_key, now - CA_YEARS, now + CA_YEARS, True,
                        _ca_extensions(root_key))
    inter = _certificate(_name("certgrab test YE1"), root.subject, inter_key.public_key(),
                         root_key, now - CA_YEARS, now + CA_YEARS, True,
                         _ca_extensions(inter_key, root_key))
    not_before = now - (lifetime - left)
    leaf = _certificate(
        x509.Name([]), inter.subject, leaf_key.public_key(), inter_key, not_before,
        not_before + lifetime, False,
        [(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), True),
         (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
         (x509.AuthorityKeyIdentifier.from_issuer_public_key(inter_key.public_key()), False)])
    files = {"root.pem": _pem(root), "cert.pem": _pem(leaf), "chain.pem": _pem(inter),
             "fullchain.pem": _pem(leaf) + _pem(inter),
             "key.pem": leaf_key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()).decode("ascii")}
    for name, text in files.items():
        with open(os.path.join(str(directory), name), "w") as f:
            f.write(text)
    return directory
