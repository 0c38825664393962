"""The spawner for isolation 'accounts': each user's server runs as their own system account."""

import asyncio

from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from traitlets import Dict

from .. import accounts


class AccountSpawner(LocalProcessSpawner):
    """JupyterHub's LocalProcessSpawner, with the account from :mod:`gpulab.accounts` (made on first spawn)
    instead of an account named like the hub user."""

    account_policy = Dict(help="gpulab.accounts.AccountPolicy fields (set by gpulab from Platform).").tag(config=True)

    _account: accounts.Account | None = None

    async def start(self):
        policy = accounts.AccountPolicy(**self.account_policy)
        try:
            self._account = await asyncio.to_thread(accounts.ensure, policy, self.user.name)
        except accounts.AccountError as e:
            raise RuntimeError(str(e)) from None
        return await super().start()

    def make_preexec_fn(self, name):
        return set_user_setuid(self._account.name)

    def user_env(self, env):
        env.update(self._account.env())
        return env
