"""The service kit (gpulab/service/): one error answer for every REST API, one gRPC<->HTTP table.

The handlers run in-process on tornado's HTTP server (as jupyter_server's ``jp_fetch`` does): what is tested is
the answer a handler's error becomes, not a service.
"""

import json
import re

import grpc
import pytest
from pydantic import BaseModel, Field
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from gpulab.service import errors
from gpulab.service.errors import STATUSES, APIError
from gpulab.service.handlers import JSONAPIMixin
from gpulab.services.infer.rest import ErrorHandler
from gpulab.services.mlflow import ProxyHandler


class Body(BaseModel):
    name: str = Field(max_length=8)
    gpus: int = 0


class Handler(JSONAPIMixin, web.RequestHandler):
    log_name = "gpulab-test"

    def get(self, what):
        if what == "api":
            raise APIError(409, "job 1 is 100% done", field="state", code="conflict", headers={"Retry-After": "3"},
                           details={"job": 1})
        if what == "tornado":
            raise web.HTTPError(400, "malformed %s", "query")
        if what == "bug":
            raise KeyError("secret-internal-detail")
        if what == "upstream":
            raise web.HTTPError(502, "a dependency's message")
        self.write_json({"ok": what})

    def post(self, what):
        self.write_json(self.parse(Body), 201)


class KServe(ErrorHandler):
    def get(self):
        raise APIError(404, "no model 'x'")


class MLflow(ProxyHandler):
    def initialize(self):
        self.has_body, self.body, self.refusal = False, None, None

    async def prepare(self):
        raise APIError(401, "authentication required")


@pytest.fixture
async def serve(loopback):
    sockets = bind_sockets(0, loopback)
    app = web.Application([(r"/kserve", KServe), (r"/mlflow", MLflow), (r"/(\w+)", Handler)])
    server = HTTPServer(app)
    server.add_sockets(sockets)
    base = f"http://{loopback}:{sockets[0].getsockname()[1]}"

    async def fetch(path, method="GET", body=None):
        r = await AsyncHTTPClient().fetch(base + path, method=method, body=body, raise_error=False)
        return r.code, r.headers, json.loads(r.body) if r.body else None

    yield fetch
    server.stop()


async def test_api_error_answers_with_its_code_field_headers_and_details(serve):
    code, headers, body = await serve("/api")
    assert code == 409 and headers["Retry-After"] == "3" and headers["Content-Type"] == "application/json"
    assert body == {"error": {"code": "conflict", "message": "job 1 is 100% done", "field": "state",
                              "details": {"job": 1}}}


async def test_tornado_errors_under_500_keep_their_message_and_get_a_code(serve):
    code, _, body = await serve("/tornado")
    assert (code, body) == (400, {"error": {"code": "bad_request", "message": "malformed query", "field": None}})


async def test_failures_of_ours_say_where_to_look_and_leak_nothing(serve):
    for path in ("/bug", "/upstream"):  # a 5xx that is not an APIError is ours, whatever it says
        code, _, body = await serve(path)
        assert code == 500 if path == "/bug" else 502
        assert body == {"error": {"code": "internal", "message": "internal error; see the gpulab-test log",
                                  "field": None}}, path


async def test_every_405_names_the_methods_in_allow(serve):
    code, headers, body = await serve("/x", method="DELETE")
    assert code == 405 and headers["Allow"] == "GET, POST"
    assert body["error"]["code"] == "method_not_allowed" and "use GET, POST" in body["error"]["message"]


async def test_bodies_are_parsed_into_models_naming_the_field_at_fault(serve):
    assert (await serve("/x", "POST", b'{"name": "a"}'))[::2] == (201, {"name": "a", "gpus": 0})
    code, _, body = await serve("/x", "POST", b'{"name": "much too long"}')
    assert code == 422 and body["error"]["field"] == "name" and body["error"]["code"] == "invalid"
    for raw, message in ((b"{", "not valid JSON"), (b"[1]", "must be a JSON object"),
                         (b"[" * 100_000, "not valid JSON|nested too deeply")):
        code, _, body = await serve("/x", "POST", raw)
        assert code == 400 and body["error"]["code"] == "invalid_json" and re.search(message, body["error"]["message"])


async def test_protocols_with_their_own_error_shape_keep_it(serve):
    assert (await serve("/kserve"))[::2] == (404, {"error": "no model 'x'"})  # KServe v2 REST
    code, _, body = await serve("/mlflow")
    assert (code, body) == (401, {"error_code": "UNAUTHENTICATED", "message": "authentication required"})


def test_one_table_between_grpc_and_http():
    for status in STATUSES:
        code = grpc.StatusCode[status.grpc]
        assert code.value[0] == status.number  # the wire number the nginx plane uses
        assert errors.http_status(code) == errors.http_status(f"StatusCode.{status.grpc}") == status.http
        assert errors.grpc_name(status.http) == status.grpc and errors.error_code(code) == status.code
    assert errors.http_status(grpc.StatusCode.ABORTED) == 500 and errors.http_status("ABORTED", 503) == 503
    assert errors.grpc_name(502) == "UNAVAILABLE" and errors.grpc_name(418) == "UNKNOWN"


def test_the_nginx_plane_gets_the_same_table():
    tables = errors.lua_tables()
    rest_status = dict(re.findall(r"\[(\d+)\] = (\d+)", tables.split("rest_code")[0]))
    rest_code = dict(re.findall(r"\[(\d+)\] = (\d+)", tables.split("rest_code")[1]))
    assert rest_status == {str(s.number): str(s.http) for s in STATUSES if s.grpc != "OK"}
    assert rest_code == {str(s.http): str(s.number) for s in STATUSES} | {"502": "14"}
