"""The lab cluster's certificates, made as kubeadm makes them, with the `cryptography` package.

Role: a real cluster authenticates its components by X.509 client certificates signed by
one cluster CA, and authorizes them by what the certificate says: the common name is the
user, the organizations are the groups. That is what confines a kubelet to its own Node
(CN=system:node:NAME in O=system:nodes, read by the Node authorizer and NodeRestriction),
and what wgmanager's trust model builds on, so the lab issues exactly those identities:

    CertificateAuthority.create()        a self-signed cluster CA (EC P-256)
      .issue(cn, groups, client=...)     a leaf: client auth (users, kubelets, controllers)
                                         and/or server auth with SANs (API server, kubelets)
    write_pair(dir, name, cert, key)     name.crt (0644) + name.key (0600)
    write_kubeconfig(...)                a kubeconfig naming its CA, cert and key by path

Why files are referenced by path and never embedded: the kubernetes Python client copies
embedded ``-data`` into temporary files it deletes only at a clean exit, so every killed
process would leave one in /tmp; the Go components read paths just as well.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, cn: str = "wgmanager-lab-ca") -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(certificate(cn, key.public_key(), key, None, is_ca=True), key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """The CA a control plane wrote: nodes added later are signed by the same one."""
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not the EC key of a lab CA")
        return cls(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)

    def save(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        write_private(key_path, private_pem(self.key))

    def issue(self, cn: str, groups: Sequence[str] = (), *, client: bool = True,
              sans: Sequence[x509.GeneralName] = (),
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A fresh key and its certificate: user ``cn`` in ``groups`` (as Kubernetes reads
        x509 subjects); a server certificate too when ``sans`` are given."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(cn, key.public_key(), self.key, self.cert, groups=groups,
                           client=client, sans=list(sans) or None)
        return cert, key


def certificate(cn: str, public_key: ec.EllipticCurvePublicKey,
                issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, *,
                is_ca: bool = False, sans: list[x509.GeneralName] | None = None,
                groups: Sequence[str] = (), client: bool = False) -> x509.Certificate:
    """A CA (issuer None: self-signed) or a leaf signed by ``issuer``.

    A leaf is a server certificate when it has ``sans`` and a client certificate when
    ``client`` is set (both at once is what a kubelet serving and calling out needs).
    """
    now = datetime.datetime.now(datetime.UTC)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    name = x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False))
    if is_ca:
        return builder.add_extension(_key_usage(ca=True), critical=True).sign(
            issuer_key, hashes.SHA256())
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if sans or not client else [])
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    builder = (builder
               .add_extension(_key_usage(ca=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer_key.public_key()), critical=False))
    if sans or not client:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans or []),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False)


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: str | bytes) -> None:
    """Writes a file only root can read (keys, tokens, kubeconfigs with tokens)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_pair(directory: Path, name: str, cert: x509.Certificate,
               key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    """``name.crt`` and ``name.key`` (0600) in ``directory``; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(key_path, private_pem(key))
    return crt, key_path


def write_kubeconfig(path: Path, *, server: str, ca: Path, user: str,
                     token: str | None = None, cert: Path | None = None,
                     key: Path | None = None) -> Path:
    """A kubeconfig (JSON, which is valid YAML) for a bearer token or a client cert pair."""
    credentials: dict[str, str] = {}
    if token is not None:
        credentials["token"] = token
    if cert is not None and key is not None:
        credentials["client-certificate"] = str(cert.resolve())
        credentials["client-key"] = str(key.resolve())
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "wgmanager-lab",
                      "cluster": {"server": server, "certificate-authority": str(ca.resolve())}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "wgmanager-lab",
                      "context": {"cluster": "wgmanager-lab", "user": user}}],
        "current-context": "wgmanager-lab",
    }
    write_private(path, json.dumps(config, indent=2) + "\n")
    return path
