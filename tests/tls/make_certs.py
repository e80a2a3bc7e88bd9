"""Regenerates the TEST-ONLY TLS files in this directory (never use them for anything else):
a CA, a server certificate for localhost / 127.0.0.1 signed by it, a client certificate for
mutual TLS signed by it, and an unrelated CA for wrong-trust tests. Valid for 100 years so
the suite does not start failing one day. Run: python tests/tls/make_certs.py (needs the
`cryptography` package, which the tests themselves do not)."""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).parent
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
LATER = NOW + dt.timedelta(days=365 * 100)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(stem: str, cert: x509.Certificate, key) -> None:
    (HERE / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (HERE / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW).not_valid_after(LATER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(cn: str, ca_cert, ca_key, *, server: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW).not_valid_after(LATER)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def main() -> None:
    ca_cert, ca_key = _ca("pipeserve test CA")
    _write("ca", ca_cert, ca_key)
    _write("server", *_leaf("localhost", ca_cert, ca_key, server=True))
    _write("client", *_leaf("pipeserve test client", ca_cert, ca_key, server=False))
    other_cert, other_key = _ca("unrelated test CA")
    _write("other_ca", other_cert, other_key)


if __name__ == "__main__":
    main()
