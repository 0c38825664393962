"""The spawner for isolation 'accounts': each user's server runs as their own system account, in a cgroup."""

import asyncio

from jupyterhub.scopes import get_scopes_for
from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from traitlets import Dict, Unicode

from .. import accounts, cgroups, scopes


class AccountSpawner(LocalProcessSpawner):
    """JupyterHub's LocalProcessSpawner, with the account from :mod:`gpulab.accounts` (made on first spawn)
    instead of an account named like the hub user, and limits that hold.

    The server (with its kernels and terminals) runs in a cgroup of its own (:mod:`gpulab.cgroups`), which
    enforces ``mem_limit`` and ``cpu_limit`` (LocalProcessSpawner only announces them) and, for a user without
    ``custom:gpulab:gpu``, denies every GPU device node (cgroup v1's devices controller, an eBPF device program
    on v2) and sets ``CUDA_VISIBLE_DEVICES=""``. Stopping the server removes the group, killing whatever the
    user left running in it.
    """

    account_policy = Dict(help="gpulab.accounts.AccountPolicy fields (set by gpulab from Platform).").tag(config=True)
    gpu_devices = Unicode(
        cgroups.GPU_DEVICES,
        help="GPU device nodes, none of which a server of a user without custom:gpulab:gpu may open.",
    ).tag(config=True)

    _account: accounts.Account | None = None
    _cgroup: cgroups.Cgroup | None = None
    _gpus = False

    def _group_name(self) -> str:
        """Named after the system account, which is this machine's alone: a hub's user ids are not (two
        platforms on one machine both have a user 1, and stopping one's server would kill the other's)."""
        account = accounts.account_name(accounts.AccountPolicy(**self.account_policy), self.user.name)
        return f"server-{account}-{self.name or 'default'}"

    async def start(self):
        policy = accounts.AccountPolicy(**self.account_policy)
        try:
            self._account = await asyncio.to_thread(accounts.ensure, policy, self.user.name)
        except accounts.AccountError as e:
            raise RuntimeError(str(e)) from None
        self._gpus = scopes.GPU in scopes.expand(get_scopes_for(self.user.orm_user))
        deny = () if self._gpus else cgroups.gpu_devices_denied(self.gpu_devices, [])
        limits = cgroups.Limits(cpus=self.cpu_limit, memory=self.mem_limit, deny_devices=deny)
        self._cgroup = cgroups.Cgroup(self._group_name(), limits)
        if error := await asyncio.to_thread(self._cgroup.create_or_fall_back):
            self.log.warning(
                "no cgroup for %s's server (%s): its limits apply as rlimits, GPU device nodes stay open",
                self.user.name,
                error,
            )
        return await super().start()

    async def stop(self, now=False):
        await super().stop(now=now)
        # after a hub restart this spawner did not make the group: find it by name (limits do not matter)
        try:
            group = self._cgroup or cgroups.Cgroup(self._group_name(), cgroups.Limits())
        except accounts.AccountError:  # no account, so no server and no group
            return
        await asyncio.to_thread(group.remove)
        self._cgroup = None

    def make_preexec_fn(self, name):
        become_user = set_user_setuid(self._account.name)
        group = self._cgroup

        def preexec():  # in the child, as root: into the group, then the account
            group.enter()
            become_user()

        return preexec

    def user_env(self, env):
        env.update(self._account.env())
        if not self._gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env
