"""
TLS for the connection to the L7R: verify the server by default, say why not.

    creator = ClientTLS("qvd.example.com", ca_file=None)    # system CAs
    endpoint = wrapClientTLS(creator, HostnameEndpoint(reactor, host, 8443))
    ...
    # when the connection is lost before the first response:
    message = creator.explain(failure)   # "certificate verify failed for ..."

C{ClientTLS(host, insecure=True)} skips every check (the CLI warns). With
verification on, the chain must lead to the system CAs or to C{ca_file}, and
the leaf certificate must name C{host} (DNS name or IP address, checked with
C{service_identity}). The first problem seen is kept in L{ClientTLS.problem}
so the user is told the reason, not just "handshake failed".
"""

import ipaddress

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _x509_error_text(errno):
    try:
        from OpenSSL._util import ffi, lib
        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode()
    except Exception:  # pragma: no cover - private API moved
        return f"X509 verification error {errno}"


def _pattern_text(pattern):
    for attribute in ("pattern", "ip"):
        value = getattr(pattern, attribute, None)
        if value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return str(pattern)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """
    Creates client TLS connections for one server C{host}.

    @ivar problem: the first verification problem of the last connection,
        as text, or C{None}.
    """

    def __init__(self, host, ca_file=None, insecure=False, cert_file=None, key_file=None):
        self.host = host
        self.ca_file = ca_file
        self.insecure = insecure
        self.problem = None
        self.wrong_name = False
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION)
        if cert_file:
            ctx.use_certificate_chain_file(cert_file)
            ctx.use_privatekey_file(key_file or cert_file)
        if insecure:
            ctx.set_verify(SSL.VERIFY_NONE)
        else:
            if ca_file:
                ctx.load_verify_locations(ca_file)
            else:
                ctx.set_default_verify_paths()
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        self._context = ctx
        self._is_ip = _is_ip(host)
        self._service_id = IPAddress_ID(host) if self._is_ip else DNS_ID(host)

    def _verify(self, conn, cert, errno, depth, ok):
        try:
            if not ok:
                if self.problem is None:
                    subject = cert.get_subject().CN or "?"
                    self.problem = (f"{_x509_error_text(errno)} "
                                    f"(certificate of {subject!r}, depth {depth})")
                return False
            if depth == 0:
                try:
                    verify_service_identity(extract_patterns(cert), [self._service_id], [])
                except VerificationError:
                    if self.problem is None:
                        names = ", ".join(_pattern_text(p) for p in extract_patterns(cert))
                        self.problem = (f"the certificate is not valid for {self.host!r} "
                                        f"(it is for: {names or 'no name'})")
                        self.wrong_name = True
                    return False
            return True
        except Exception as e:  # never raise into OpenSSL
            self.problem = self.problem or f"error while verifying the certificate: {e}"
            return False

    def clientConnectionForTLS(self, tlsProtocol):
        self.problem = None
        self.wrong_name = False
        conn = SSL.Connection(self._context, None)
        conn.set_app_data(tlsProtocol)
        if not self._is_ip:
            conn.set_tlsext_host_name(self.host.encode("idna"))
        return conn

    def explain(self, port, reason=None):
        """
        One line saying why TLS with the server failed, naming the host and
        what to do, or C{None} if there was no verification problem.
        """
        if self.problem is None:
            return None
        if self.wrong_name:
            hint = "connect with --host set to a name the certificate is for"
        else:
            hint = ("pass --ca FILE with the CA that signed the server's certificate "
                    "(or --insecure to skip verification, not recommended)")
        return (f"TLS verification of {self.host}:{port} failed: {self.problem}; {hint}")
