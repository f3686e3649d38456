"""
The L7R's TLS: material from files or the database, a context that allows
only TLS 1.2/1.3 with strong ciphers, and a context factory whose context can
be swapped for new connections without touching live ones.

    material = await load_material(config, db)        # TLSMaterial (PEM bytes)
    factory = SwappableContextFactory(make_context(material, config))
    ...
    factory.swap(make_context(new_material, config))  # new connections only

Material comes from C{ssl_configs} (C{l7r.ssl.key}, C{.cert}, C{.ca}, C{.crl})
when it holds a key and a certificate, else from the files
C{path.l7r.ssl.{key,cert,ca,crl}}. A key file readable by other users is
refused with L{TLSConfigError} (one clear message saying how to fix it).
L{self_signed} writes a new key and certificate for a single-node demo.
"""

import datetime
import ipaddress
import os
import stat

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer


class TLSConfigError(Exception):
    """
    The TLS key, certificate, CA or CRL is missing, unsafe or invalid.
    """


@attrs.frozen
class TLSMaterial:
    key: bytes
    cert: bytes
    ca: bytes = None
    crl: bytes = None
    source: str = ""


def _read(path, what, required=True):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        if required:
            raise TLSConfigError(
                f"the L7R's {what} file {path} does not exist: put a PEM {what} there, "
                "store it in the database (ssl_configs l7r.ssl.*), or start with --self-signed")
        return None
    except OSError as e:
        raise TLSConfigError(f"cannot read the L7R's {what} file {path}: {e.strerror}")


def check_key_file(path):
    """
    Refuse a private key file that users other than its owner may read.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if mode & (stat.S_IRWXO):
        raise TLSConfigError(
            f"the L7R's private key {path} is accessible by every user "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")


def files_material(config):
    key_path = config.get("path.l7r.ssl.key")
    check_key_file(key_path)
    return TLSMaterial(
        key=_read(key_path, "private key"),
        cert=_read(config.get("path.l7r.ssl.cert"), "certificate"),
        ca=_read(config.get("path.l7r.ssl.ca"), "CA certificate", required=False),
        crl=_read(config.get("path.l7r.ssl.crl"), "CRL", required=False),
        source="files")


async def load_material(config, db):
    """
    The TLS material from the database when it has key and certificate,
    else from the files.
    """
    rows = {}
    if db is not None:
        rows = dict(await db.runQuery("SELECT key, value FROM ssl_configs"))
    if rows.get("l7r.ssl.key") and rows.get("l7r.ssl.cert"):
        def b(name):
            value = rows.get(name)
            return value.encode() if value else None
        return TLSMaterial(key=b("l7r.ssl.key"), cert=b("l7r.ssl.cert"), ca=b("l7r.ssl.ca"),
                           crl=b("l7r.ssl.crl"), source="database")
    return files_material(config)


def file_stamps(config):
    """
    What identifies the current certificate files (path -> (mtime, size)).
    """
    stamps = {}
    for name in ("key", "cert", "ca", "crl"):
        path = config.get(f"path.l7r.ssl.{name}")
        try:
            st = os.stat(path)
            stamps[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamps[path] = None
    return stamps


def make_context(material, ciphers, require_client_cert=False):
    """
    An OpenSSL server context for C{material}: TLS 1.2 and 1.3 only,
    C{ciphers} for TLS 1.2, server cipher preference, no compression or
    renegotiation; client certificates verified against the CA (and CRL)
    when required.
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_COMPRESSION
                    | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    try:
        ctx.set_cipher_list(ciphers.encode("ascii"))
    except SSL.Error as e:
        raise TLSConfigError(f"l7r.ssl.ciphers {ciphers!r} selects no usable cipher: {e}")
    try:
        certs = x509.load_pem_x509_certificates(material.cert)
    except ValueError as e:
        raise TLSConfigError(f"the L7R's certificate ({material.source}) is not PEM: {e}")
    try:
        key = serialization.load_pem_private_key(material.key, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"the L7R's private key ({material.source}) is not an "
                             f"unencrypted PEM key: {e}")
    ctx.use_certificate(crypto.X509.from_cryptography(certs[0]))
    for extra in certs[1:]:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"the L7R's private key does not match its certificate "
                             f"({material.source})")
    if require_client_cert:
        if not material.ca:
            raise TLSConfigError("l7r.client.cert.require is set but there is no CA "
                                 "(path.l7r.ssl.ca or ssl_configs l7r.ssl.ca)")
        store = ctx.get_cert_store()
        for ca in x509.load_pem_x509_certificates(material.ca):
            store.add_cert(crypto.X509.from_cryptography(ca))
        if material.crl:
            store.add_crl(x509.load_pem_x509_crl(material.crl))
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                       lambda conn, cert, errno, depth, ok: bool(ok))
    ctx.set_session_id(b"qvd-l7r")
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class SwappableContextFactory:
    """
    A server context factory whose context can be replaced: connections made
    after L{swap} use the new one, existing ones keep theirs.
    """

    def __init__(self, context):
        self._context = context

    def getContext(self):
        return self._context

    def serverConnectionForTLS(self, protocol):
        return SSL.Connection(self._context, None)

    def swap(self, context):
        self._context = context


def demo_names(hostname):
    """
    The subjectAltName entries of the demo certificate: C{hostname} (a DNS
    name, or an IP address if it is one), C{localhost}, 127.0.0.1 and ::1.
    """
    names = []
    for item in (hostname, "localhost", "127.0.0.1", "::1"):
        try:
            name = x509.IPAddress(ipaddress.ip_address(item))
        except ValueError:
            name = x509.DNSName(item)
        if name not in names:
            names.append(name)
    return names


def self_signed(directory, hostname, days=3650):
    """
    Write a new EC P-256 key and a self-signed certificate for C{hostname}
    to C{directory}/key.pem and cert.pem (directory 0700, files 0600). The
    certificate also names C{localhost}, 127.0.0.1 and ::1, so a client on
    the node itself verifies it whichever of these it connects to.

    @return: (key path, cert path)
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(demo_names(hostname)), critical=False)
            .sign(key, hashes.SHA256()))
    key_path = os.path.join(directory, "key.pem")
    cert_path = os.path.join(directory, "cert.pem")
    for path, data in ((key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())),
            (cert_path, cert.public_bytes(serialization.Encoding.PEM))):
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path + ".tmp", 0o600)
        os.replace(path + ".tmp", path)
    return key_path, cert_path
