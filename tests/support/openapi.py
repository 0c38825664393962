"""Check API responses against the OpenAPI specs in the repo."""

from pathlib import Path

import jsonschema
import yaml


class Spec:
    """An OpenAPI 3.1 document; validates response bodies against its schemas."""

    def __init__(self, path: Path):
        self.doc = yaml.safe_load(Path(path).read_text())

    def paths(self) -> set[str]:
        return set(self.doc["paths"])

    def validate(self, path: str, method: str, status: int, body) -> None:
        op = self.doc["paths"][path][method.lower()]
        response = op["responses"][str(status)]
        if "$ref" in response:
            response = self._resolve(response["$ref"])
        schema = response["content"]["application/json"]["schema"]
        jsonschema.validate(body, {**schema, "components": self.doc["components"]},
                            cls=jsonschema.Draft202012Validator)

    def _resolve(self, ref: str):
        node = self.doc
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return node
