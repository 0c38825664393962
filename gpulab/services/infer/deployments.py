"""Deployments in ``gpulab-infer``: MLflow models converted to ONNX, written to the Triton model repository as
new versions, and loaded on every replica.

A deploy fetches and converts the model in a child process (:mod:`gpulab.inference.convert`, without the
gateway's secrets), writes ``<repository>/<name>/<n+1>/`` beside the older versions and asks every healthy
replica to load the model (RepositoryModelLoad with the platform key). Triton's version policy ``latest 1``
then serves the new version once it is ready and retires the old one after its in-flight requests finish, so
a new version costs no failed requests. Who deployed what is kept in ``gpulab-models.json`` in the repository
(Triton ignores files there); only a model's owner or an admin may change or delete it. Deleting unloads the
model and removes its directory, so a replica that restarts (``--load-model=*``) does not bring it back.
"""

import asyncio
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2

from ...inference.triton import BACKENDS, write_onnx_model
from ...scopes import ADMIN
from ...service.errors import APIError
from ..mlflow.identity import delegated_credential
from .auth import Identity
from .records import NAME, ModelRecords
from .replicas import NoReplicaError, ReplicaPool

log = logging.getLogger(__name__)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CONVERTER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")


class DeployError(APIError):
    """A refused or failed deployment: HTTP status, message, the request ``field`` at fault, ``code``."""

    def __init__(self, status: int, message: str, field: str | None = None, code: str = "invalid"):
        super().__init__(status, message, field, code)


def normalize_source(source) -> str:
    """``runs:/<run_id>/<path>``, ``models:/<name>/<version>`` (or ``@alias``), or a bare run id (its ``model``)."""
    if not isinstance(source, str) or not source.strip():
        raise DeployError(
            400, "source is required: runs:/<run_id>/model, models:/<name>/<version> or a run id", "source"
        )
    source = source.strip()
    if RUN_ID.match(source):
        return f"runs:/{source}/model"
    if re.match(r"^runs:/[0-9a-f]{32}/\S+$", source) or re.match(r"^models:/[^/\s]+(/[^/\s]+|@\S+)$", source):
        return source
    raise DeployError(
        400, f"source '{source}' is not runs:/<run_id>/<path>, models:/<name>/<version> or a run id", "source"
    )


class Deployments:
    """The model repository and model control for the gateway's :class:`ReplicaPool`."""

    def __init__(
        self,
        repository: str | None,
        pool: ReplicaPool,
        mlflow_url: str,
        allow_pickle: bool = False,
        timeout: float = 600.0,
        mlflow_token: str = "",
        act_for_caller: bool = False,
    ):
        self.repository = Path(repository) if repository else None
        self.model_records = ModelRecords(self.repository)
        self.pool = pool
        self.mlflow_url = mlflow_url
        self.mlflow_token = mlflow_token
        self.act_for_caller = act_for_caller  # the platform's MLflow: fetch as the deployer, so MLflow decides
        self.allow_pickle = allow_pickle
        self.timeout = timeout
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # --- the repository on disk ------------------------------------------------------------------------------
    def _repo(self) -> Path:
        if self.repository is None:
            raise DeployError(
                409,
                "this platform has no model repository to deploy to (Triton replicas are "
                "external and InferenceGateway.model_repository is not set)",
                code="no_repository",
            )
        return self.repository

    def versions(self, name: str) -> list[int]:
        model_dir = self._repo() / name
        return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) if model_dir.is_dir() else []

    # --- Triton -----------------------------------------------------------------------------------------------
    async def _control(self, rpc: str, message, timeout: float | None = None) -> bytes:
        if rpc.startswith("RepositoryModel"):
            return await self.pool.broadcast(rpc, message.SerializeToString(), self.pool.metadata, timeout)
        request = message.SerializeToString()
        return await self.pool.forward(lambda r: r.call(rpc, request, self.pool.metadata, timeout), True)

    async def states(self) -> dict[str, dict[int, str]]:
        """Each model's versions Triton knows, with their state (READY, LOADING, UNAVAILABLE, ...)."""
        try:
            reply = await self._control("RepositoryIndex", service_pb2.RepositoryIndexRequest(), timeout=10)
        except (NoReplicaError, grpc.aio.AioRpcError) as e:
            log.warning("gpulab-infer: no repository index: %s", e)
            return {}
        out: dict[str, dict[int, str]] = defaultdict(dict)
        for model in service_pb2.RepositoryIndexResponse.FromString(reply).models:
            if model.version.isdigit():
                out[model.name][int(model.version)] = model.state
        return out

    async def _metadata(self, name: str) -> tuple[list[dict], list[dict]]:
        """Inputs and outputs of a ready model gpulab did not deploy, as Triton serves them."""
        try:
            reply = await self._control("ModelMetadata", service_pb2.ModelMetadataRequest(name=name), timeout=10)
        except (NoReplicaError, grpc.aio.AioRpcError):
            return [], []
        meta = service_pb2.ModelMetadataResponse.FromString(reply)
        return tuple(
            [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]
            for tensors in (meta.inputs, meta.outputs)
        )

    # --- the API ----------------------------------------------------------------------------------------------
    async def describe(self, name: str, states: dict | None = None, records: dict | None = None) -> dict:
        """A model as the API shows it; 404 if the repository has no such model."""
        if name not in self.model_records.names():
            raise DeployError(404, f"no model named '{name}'", "name", "not_found")
        states = await self.states() if states is None else states
        record = (self.model_records.records() if records is None else records).get(name, {})
        known = states.get(name, {})
        versions = [
            {"version": v, "state": known.get(v, "UNAVAILABLE"), **record.get("versions", {}).get(str(v), {})}
            for v in self.versions(name)
        ]
        ready = any(v["state"] == "READY" for v in versions)
        if "inputs" in record:
            inputs, outputs = record["inputs"], record["outputs"]
        else:
            inputs, outputs = await self._metadata(name) if ready else ([], [])
        return {
            "name": name,
            "owner": record.get("owner"),
            "backend": record.get("backend"),
            "ready": ready,
            "versions": versions,
            "inputs": inputs,
            "outputs": outputs,
        }

    async def list(self) -> list[dict]:
        states, records = await self.states(), self.model_records.records()
        return [await self.describe(name, states, records) for name in self.model_records.names()]

    def _check_owner(self, who: Identity, name: str) -> None:
        if refusal := self.model_records.refusal(who, name):
            raise DeployError(403, refusal, "name", "forbidden")

    async def deploy(self, who: Identity, source, name, backend) -> dict:
        """Convert ``source`` and serve it as the next version of ``name``; returns the model."""
        if not isinstance(name, str) or not NAME.match(name):
            raise DeployError(
                400, "name must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit", "name"
            )
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise DeployError(400, f"backend must be one of {', '.join(BACKENDS)}", "backend")
        source = normalize_source(source)
        repo = self._repo()
        if not self.mlflow_url:
            raise DeployError(
                409,
                "this platform has no MLflow to deploy from (InferenceGateway.mlflow_url is not set)",
                code="no_mlflow",
            )
        async with self._locks[name]:
            self._check_owner(who, name)
            with tempfile.TemporaryDirectory(prefix="gpulab-deploy-") as tmp:
                converted = await self._convert(who, source, Path(tmp), float32=backend != "python-onnx")
                model_dir = repo / name
                config = model_dir / "config.pbtxt"
                previous = config.read_text() if config.exists() else None
                version = max(self.versions(name), default=0) + 1
                await asyncio.to_thread(write_onnx_model, repo, name, Path(tmp) / "model.onnx", version, backend)
            try:
                await self._control(
                    "RepositoryModelLoad", service_pb2.RepositoryModelLoadRequest(model_name=name), self.timeout
                )
            except (NoReplicaError, grpc.aio.AioRpcError) as e:
                await self._roll_back(name, version, previous)
                if isinstance(e, NoReplicaError):
                    raise DeployError(503, str(e), code="unavailable") from None
                raise DeployError(
                    422, f"Triton could not load '{name}' version {version}: {e.details()}", "source", "load_failed"
                ) from None
            records = self.model_records.records()
            record = records.setdefault(name, {"owner": who.name, "versions": {}})
            record.update(backend=backend, inputs=converted["inputs"], outputs=converted["outputs"])
            record["versions"][str(version)] = {
                "source": source,
                "flavor": converted["flavor"],
                "deployed_by": who.name,
                "deployed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            self.model_records.save(records)
            return await self.describe(name, records=records)

    async def _convert(self, who: Identity, source: str, out: Path, float32: bool) -> dict:
        """Run :mod:`gpulab.inference.convert` in a child process; returns its ``{"flavor", "inputs", "outputs"}``."""
        env = {k: os.environ[k] for k in CONVERTER_ENV if k in os.environ}
        env.update(
            MLFLOW_TRACKING_URI=self.mlflow_url,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
            MLFLOW_HTTP_REQUEST_TIMEOUT="60",
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        if self.mlflow_token and self.act_for_caller:
            env["MLFLOW_TRACKING_TOKEN"] = delegated_credential(who.name, ADMIN in who.scopes, self.mlflow_token)
        elif self.mlflow_token:
            env["MLFLOW_TRACKING_TOKEN"] = self.mlflow_token
        if self.allow_pickle:
            env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
        argv = [sys.executable, "-m", "gpulab.inference.convert", source, str(out), *(["--float32"] if float32 else [])]
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=out, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DeployError(422, f"converting {source} took over {self.timeout:g} s", "source") from None
        try:
            answer = json.loads(stdout.decode().strip().splitlines()[-1])
        except (IndexError, ValueError):
            tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            log.error("gpulab-infer: converting %s failed:\n%s", source, stderr.decode(errors="replace")[-4000:])
            raise DeployError(422, f"cannot convert {source}: {tail[0]}", "source") from None
        if "error" in answer:
            error = answer["error"]
            codes = {404: "not_found", 422: "unsupported", 503: "unavailable"}
            raise DeployError(error["status"], error["message"], error["field"], codes.get(error["status"], "invalid"))
        return answer

    async def _roll_back(self, name: str, version: int, previous_config: str | None) -> None:
        """Undo a version that did not load: remove it and bring back what was served before (if anything)."""
        model_dir = self._repo() / name
        shutil.rmtree(model_dir / str(version), ignore_errors=True)
        try:
            if previous_config is None or not self.versions(name):
                shutil.rmtree(model_dir, ignore_errors=True)
                await self._control(
                    "RepositoryModelUnload", service_pb2.RepositoryModelUnloadRequest(model_name=name), self.timeout
                )
            else:
                (model_dir / "config.pbtxt").write_text(previous_config)
                await self._control(
                    "RepositoryModelLoad", service_pb2.RepositoryModelLoadRequest(model_name=name), self.timeout
                )
        except (NoReplicaError, grpc.aio.AioRpcError) as e:
            log.warning("gpulab-infer: rolling back %s version %d: %s", name, version, e)

    async def delete(self, who: Identity, name: str) -> None:
        """Unload ``name`` everywhere and remove it from the repository."""
        if name not in self.model_records.names():
            raise DeployError(404, f"no model named '{name}'", "name", "not_found")
        async with self._locks[name]:
            self._check_owner(who, name)
            try:
                await self._control(
                    "RepositoryModelUnload", service_pb2.RepositoryModelUnloadRequest(model_name=name), self.timeout
                )
            except NoReplicaError:
                pass  # no replica is up; removing the directory keeps them from loading it when they start
            except grpc.aio.AioRpcError as e:
                raise DeployError(
                    502, f"Triton could not unload '{name}': {e.details()}", "name", "unload_failed"
                ) from None
            shutil.rmtree(self._repo() / name)
            records = self.model_records.records()
            if records.pop(name, None) is not None:
                self.model_records.save(records)
