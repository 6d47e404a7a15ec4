"""The run's TLS authority: a CA in the registry folder, the broker's server certificate, and
client certificates for mutual TLS, all made with the ``cryptography`` package (ECDSA P-256,
SHA-256).  A device trusts the broker because its credentials file carries ``ca.pem``.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora_edge.core import durable

if TYPE_CHECKING:  # cryptography is imported where it is used (_x509)
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

CA_DAYS, LEAF_DAYS = 3650, 825


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _x509():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, hashes, serialization, ec, NameOID, ExtendedKeyUsageOID


def _pem_key(key) -> bytes:
    _, _, serialization, *_ = _x509()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    _, _, serialization, *_ = _x509()
    return cert.public_bytes(serialization.Encoding.PEM)


def create_ca(folder: str | Path, name: str | None = None) -> Authority:
    import secrets

    x509, hashes, _, ec, NameOID, _ = _x509()
    folder = Path(folder)
    name = name or f"fedlora-edge CA {secrets.token_hex(4)}"  # a name of its own: two registries' CAs differ
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    durable.write_bytes(folder / "ca.key", _pem_key(key), 0o600)
    durable.write_bytes(folder / "ca.pem", _pem_cert(cert))
    return Authority(cert, key)


def load_ca(folder: str | Path) -> Authority:
    x509, _, serialization, *_ = _x509()
    folder = Path(folder)
    if not (folder / "ca.key").is_file():
        raise FileNotFoundError(f"no certificate authority in {folder} (ca.key): make the registry with "
                                "`fedlora devices init`")
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    return Authority(cert, key)


def _leaf(ca: Authority, common_name: str, server_names: list[str] | None):
    x509, hashes, _, ec, NameOID, EKU = _x509()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    serial = x509.random_serial_number()
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
         .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(serial)
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if server_names is not None:
        sans = []
        for n in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([EKU.CLIENT_AUTH]), critical=False)
    return b.sign(ca.key, hashes.SHA256()), key, serial


def issue_server(ca: Authority, names: list[str], cert_path: str | Path, key_path: str | Path) -> None:
    """A server certificate for the broker, valid for ``names`` (host names or IP addresses)."""
    if not names:
        raise ValueError("a server certificate needs at least one host name or address")
    cert, key, _ = _leaf(ca, names[0], names)
    durable.write_bytes(key_path, _pem_key(key), 0o600)
    durable.write_bytes(cert_path, _pem_cert(cert))


def issue_client(ca: Authority, device: str) -> tuple[str, str, int]:
    """(certificate PEM, key PEM, serial) of a client certificate whose common name is ``device``
    (a broker with ``use_identity_as_username`` takes it as the user name)."""
    cert, key, serial = _leaf(ca, device, None)
    return _pem_cert(cert).decode(), _pem_key(key).decode(), serial


def write_crl(ca: Authority, serials: list[int], path: str | Path) -> None:
    """A certificate revocation list of the revoked devices' client certificates."""
    x509, hashes, *_ = _x509()
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(now)
         .next_update(now + datetime.timedelta(days=30)))
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
    _, _, serialization, *_ = _x509()
    durable.write_bytes(path, b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
