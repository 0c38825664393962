"""``/gpulab/api/v1/attestation/...`` in the user's server: GPU node attestation, acting for this server's user.

Forwarded to ``gpulab-jobs``, which holds the attestation service and the NRAS API key: neither is
ever in a user's server, where a kernel could read what the server can.
"""

from .jobs_api import ServiceProxyHandler, forwarding


class AttestationProxyHandler(ServiceProxyHandler):
    auth_resource = "gpulab:attest"


ROUTES = [
    (f"/attestation/{action}", forwarding(f"/attestation/{action}", method, base=AttestationProxyHandler))
    for action, method in (("nonce", "POST"), ("verify", "POST"), ("evidence", "POST"), ("nodes", "GET"))
]
