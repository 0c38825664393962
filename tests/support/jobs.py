"""A user of the gpulab-jobs REST API through the hub, with their own hub token."""

import time

import requests

from tests.support.gpulab_up import Platform

FINAL = ("succeeded", "failed", "cancelled", "timed_out")


class Client:
    """A user of the job API with their own hub token."""

    def __init__(self, hub: Platform, user: str, token: str | None = None):
        self.base = f"{hub.url}/services/gpulab-jobs/api/v1"
        self.headers = {"Authorization": f"token {token or hub.token(user)}"}

    def request(self, method, path, **kwargs):
        return requests.request(method, self.base + path, headers=self.headers, timeout=30, **kwargs)

    def submit(self, expect=201, **spec):
        spec.setdefault("name", "test")
        r = self.request("POST", "/jobs", json=spec)
        assert r.status_code == expect, r.text
        return r.json()

    def wait(self, job_id, states=FINAL, timeout=60):
        deadline = time.monotonic() + timeout
        job = {}
        while time.monotonic() < deadline:
            r = self.request("GET", f"/jobs/{job_id}")
            if r.status_code == 200:  # (the service may be restarting)
                job = r.json()
                if job["state"] in states:
                    return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not reach {states}: {job}")

    def logs(self, job_id) -> str:
        return self.request("GET", f"/jobs/{job_id}/logs").text
