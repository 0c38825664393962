"""``/gpulab/api/v1/attestation/...`` in the user's server: GPU node attestation, acting for this server's user.

Forwarded to ``gpulab-jobs``, which holds the attestation service and the NRAS API key: neither is
ever in a user's server, where a kernel could read what the server can.
"""

from tornado import web

from .jobs_api import ServiceProxyHandler


class AttestationProxyHandler(ServiceProxyHandler):
    auth_resource = "gpulab:attest"


class NonceHandler(AttestationProxyHandler):
    @web.authenticated
    async def post(self):
        await self.forward("/attestation/nonce")


class VerifyHandler(AttestationProxyHandler):
    @web.authenticated
    async def post(self):
        await self.forward("/attestation/verify")


class EvidenceHandler(AttestationProxyHandler):
    @web.authenticated
    async def post(self):
        await self.forward("/attestation/evidence")


class NodesHandler(AttestationProxyHandler):
    @web.authenticated
    async def get(self):
        await self.forward("/attestation/nodes")


ROUTES = [
    ("/attestation/nonce", NonceHandler),
    ("/attestation/verify", VerifyHandler),
    ("/attestation/evidence", EvidenceHandler),
    ("/attestation/nodes", NodesHandler),
]
