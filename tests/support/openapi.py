"""Check API responses against the OpenAPI specs in the repo (local and relative-file ``$ref``s)."""

from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource


class _StrictLoader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = {k for k in keys if keys.count(k) > 1}
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f"keys given twice: {sorted(twice)}", node.start_mark)
        return super().construct_mapping(node, deep)


def load(path: Path):
    return yaml.load(Path(path).read_text(), Loader=_StrictLoader)


class Spec:
    """An OpenAPI 3.1 document; validates response bodies against its schemas."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.doc = load(self.path)

    def paths(self) -> set[str]:
        return set(self.doc["paths"])

    def validate(self, path: str, method: str, status: int, body) -> None:
        response = self.doc["paths"][path][method.lower()]["responses"][str(status)]
        if "$ref" in response:
            response = self._local(response["$ref"])
        schema = self._absolute(response["content"]["application/json"]["schema"])
        schema["$id"] = self.path.with_name("__response__.json").as_uri()
        jsonschema.Draft202012Validator(schema, registry=self._registry()).validate(body)

    def _absolute(self, node):
        """A copy of ``node`` whose "#/..." refs point into this file, so it can be validated alone."""
        if isinstance(node, dict):
            return {
                k: (self.path.as_uri() + v if k == "$ref" and v.startswith("#") else self._absolute(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [self._absolute(v) for v in node]
        return node

    def _local(self, ref: str):
        node = self.doc
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        return node

    def _registry(self) -> Registry:
        """Resolves "#/..." against this file and "other.yaml#/..." against files beside it."""

        def retrieve(uri: str) -> Resource:
            target = Path(uri.removeprefix("file://"))
            return Resource.opaque(load(target))

        base = self.path.as_uri()
        return Registry(retrieve=retrieve).with_resource(base, Resource.opaque(self.doc))
