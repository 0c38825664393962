"""A fourth REST service, written as the service kit means a newcomer to write one: its settings (a
Configurable), its pydantic body, its handlers (the kit's :class:`HubUserHandler`: hub auth, errors, body cap,
tracing) and a :class:`ServiceApp` subclass. ``python -m tests.support.greeter_service``, run by
tests/test_service_kit.py as a hub-managed service of a real ``gpulab up``."""

import asyncio
from urllib.parse import urlsplit

from pydantic import BaseModel, Field
from traitlets import Integer, Unicode
from traitlets.config import Configurable

from gpulab.service.app import ServiceApp
from gpulab.service.errors import APIError
from gpulab.service.handlers import HubUserHandler


class Greeter(Configurable):
    greeting = Unicode("hello", help="What every greeting starts with.").tag(config=True)
    max_names = Integer(3, min=1, help="Names one request may greet.").tag(config=True)


class Names(BaseModel):
    names: list[str] = Field(min_length=1, max_length=100)


class GreetHandler(HubUserHandler):
    log_name = "greeter"
    max_body = 1024

    def initialize(self, greeter: Greeter):
        self.greeter = greeter

    def post(self):
        body = self.parse(Names)
        if len(body.names) > self.greeter.max_names:
            raise APIError(422, f"at most {self.greeter.max_names} names", field="names", code="invalid")
        self.write_json({"from": self.user_name, "greetings": [f"{self.greeter.greeting}, {n}" for n in body.names]})


class GreeterApp(ServiceApp):
    name = "greeter"
    classes = [Greeter]

    def initialize(self, argv=None) -> None:
        super().initialize(argv)
        self.hub.require("service_url", "api_token")

    async def serve(self, stopping: asyncio.Event) -> None:
        greeter = Greeter(parent=self)
        app = self.web_application([(self.hub.prefix + "api/v1/greet", GreetHandler, {"greeter": greeter})])
        address = urlsplit(self.hub.service_url)
        server = app.listen(address.port, address.hostname)
        await stopping.wait()
        server.stop()


if __name__ == "__main__":
    GreeterApp.launch_instance()
