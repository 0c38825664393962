"""Who owns which model: ``gpulab-models.json`` in the model repository (the deploy API writes it), and the one
rule every path that changes a model applies, the deploy API's and gRPC model control's alike."""

import json
import re
from pathlib import Path

from ...scopes import ADMIN
from .auth import Identity

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RECORDS = "gpulab-models.json"


class ModelRecords:
    """The records of the repository at ``repository`` (None: external replicas, no repository of gpulab's)."""

    def __init__(self, repository: Path | None):
        self.repository = repository

    def records(self) -> dict:
        try:
            return json.loads((self.repository / RECORDS).read_text()) if self.repository else {}
        except FileNotFoundError:
            return {}

    def save(self, records: dict) -> None:
        tmp = self.repository / f".{RECORDS}.tmp"
        tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
        tmp.replace(self.repository / RECORDS)

    def names(self) -> list[str]:
        """The models in the repository."""
        if self.repository is None or not self.repository.is_dir():
            return []
        return sorted(p.name for p in self.repository.iterdir() if (p / "config.pbtxt").exists() and NAME.match(p.name))

    def refusal(self, who: Identity, name: str) -> str | None:
        """Why ``who`` may not load, unload, replace or delete model ``name``; None if they may.

        A model in the repository belongs to whoever deployed it first, one without a record to the platform;
        only its owner or an admin may change it. Without a repository (external replicas) no model is a
        user's: the scope decides."""
        if ADMIN in who.scopes or name not in self.names():
            return None
        owner = self.records().get(name, {}).get("owner")
        if owner == who.name:
            return None
        return f"model '{name}' belongs to {owner or 'the platform'}: only its owner or an admin may change it"
