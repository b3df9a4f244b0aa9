"""The federation PKI: one CA, certificates that carry an identity and a role, a CRL.

Identity and role travel in the certificate as a URI SAN ``stimnet://<role>/<name>``, so
the servicers take them from the TLS peer certificate and never from request fields.
The CA directory holds ``ca.crt``, ``ca.key``, ``crl.pem`` and ``index.json`` (the
registry of every certificate the CA has signed); see ``certs/README.md``.

Every failure is a :class:`PkiError` whose message names the file or identity at fault.

The package's modules, lowest first: ``names`` (the error, roles, serials, times),
``files`` (the CA directory and certificate files), ``identity`` (what a certificate
speaks for), ``index`` (the CA's registry), ``crl`` (revocation), ``authority``
(creating the CA), ``issuing`` (issuing and renewing leaves) and ``verify`` (checking a
certificate and a signed payload). Callers use the names re-exported here.
"""

from stimnet.pki.authority import init_ca
from stimnet.pki.crl import CRL_DAYS, RevocationList, refresh_crl, revoke
from stimnet.pki.files import CA_CERT, CA_KEY, CRL_FILE, INDEX_FILE, load_cert, load_key
from stimnet.pki.identity import Identity, identity_from_cert
from stimnet.pki.index import CertRecord, list_certs
from stimnet.pki.issuing import IssuedCert, issue, renew
from stimnet.pki.names import ROLES, URI_SCHEME, PkiError, check_name, check_role, serial_hex
from stimnet.pki.verify import sign_payload, verify_chain, verify_payload

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CRL_DAYS",
    "CRL_FILE",
    "INDEX_FILE",
    "ROLES",
    "URI_SCHEME",
    "CertRecord",
    "Identity",
    "IssuedCert",
    "PkiError",
    "RevocationList",
    "check_name",
    "check_role",
    "identity_from_cert",
    "init_ca",
    "issue",
    "list_certs",
    "load_cert",
    "load_key",
    "refresh_crl",
    "renew",
    "revoke",
    "serial_hex",
    "sign_payload",
    "verify_chain",
    "verify_payload",
]
