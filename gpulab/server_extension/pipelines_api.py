"""``/gpulab/api/v1/pipelines...`` in the user's server: ``POST`` submits a pipeline file of this server, as ``gpulab
pipeline submit`` does (:func:`gpulab.kernels.pipelines.submit_pipeline`: every step checked here, then the whole
pipeline sent to the job service); JupyterLab's "Run pipeline" on a ``.yaml`` file calls it. Listing, reading and
cancelling pipelines go to the job service as they are."""

import asyncio

from pydantic import BaseModel, ConfigDict, Field
from tornado import web

from ..kernels.pipelines import submit_pipeline
from ..service.client import APIError as ServiceRefusal
from ..service.client import GpulabError, NotConfigured, Unreachable
from ..service.errors import APIError
from .jobs_api import JobsProxyHandler, forwarding
from .notebooks_api import server_file


class PipelineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1024, description="The pipeline file, relative to the server's root.")


class PipelinesHandler(JobsProxyHandler):
    @web.authenticated
    async def post(self):
        request = self.parse(PipelineRequest)
        file = server_file(self, request.path, (".yaml", ".yml"), "a pipeline file (.yaml or .yml)")
        try:
            pipeline = await asyncio.to_thread(submit_pipeline, file)
        except ServiceRefusal as e:  # the job service refused it (nothing of it was queued)
            raise APIError(e.status, e.message, field=e.field, code=e.code or "invalid") from None
        except (NotConfigured, Unreachable) as e:
            raise APIError(503, str(e), code="unavailable") from None
        except GpulabError as e:  # the file or a step as written (a cycle, an unknown step, a missing notebook)
            raise APIError(422, str(e), field="steps") from None
        self.write_json(pipeline.data, 201)

    @web.authenticated
    async def get(self):
        await self.forward("/pipelines")


PIPELINE_ID = r"(?P<pipeline_id>[0-9a-f]{32})"
ROUTES = [
    ("/pipelines", PipelinesHandler),
    (f"/pipelines/{PIPELINE_ID}", forwarding("/pipelines/{pipeline_id}", "GET")),
    (f"/pipelines/{PIPELINE_ID}/cancel", forwarding("/pipelines/{pipeline_id}/cancel", "POST")),
]
