"""Saved run configs: `/api/training/configs` (docs/serve.md). A config is validated and
confined as a job would run it when it is saved or explained, and saved as given."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from pydantic import AfterValidator, BaseModel, Field

from kiln.serve.api.common import ConfinementDep, StateDirDep, StoreDep, checked

__all__ = ["MAX_DEPTH", "Config", "ConfigIn", "router"]

MAX_DEPTH = 32
"""Deepest nesting of a config's mappings and lists (a real one is under 6 deep)."""


def _shallow(config: dict[str, Any]) -> dict[str, Any]:
    """`config`, when no mapping or list in it is nested more than MAX_DEPTH deep (walked
    without recursion: a deeper one would exhaust the stack of whatever reads it next)."""
    stack: list[tuple[Any, int]] = [(config, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node
        stack += [(c, depth + 1) for c in children if isinstance(c, dict | list)]
    return config


Config = Annotated[dict[str, Any], AfterValidator(_shallow)]


class ConfigIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    config: Config


router = APIRouter()


def _unstarted(state_dir: Path) -> Path:
    """Where a saved config's relative paths are judged from: it has no job (no run dir) yet."""
    return state_dir / "runs" / "unstarted"


@router.post("/api/training/configs", status_code=201)
def add_config(
    body: ConfigIn, store: StoreDep, confinement: ConfinementDep, state_dir: StateDirDep
) -> dict[str, Any]:
    checked(body.config, confinement, _unstarted(state_dir))  # saved as given, confined at start
    return store.add_config(body.name, body.config).to_dict()


@router.post("/api/training/configs/explain")
def explain_config(
    body: ConfigIn, confinement: ConfinementDep, state_dir: StateDirDep
) -> dict[str, Any]:
    """What the config implies (`kiln config explain`), before it is started."""
    from kiln.config import load_config
    from kiln.errors import KilnError
    from kiln.explain import explain, explain_facts

    cfg = load_config(data=checked(body.config, confinement, _unstarted(state_dir)))
    try:  # epochs are counted on the data: a data file can still be wrong
        return {**explain_facts(cfg), "text": explain(cfg)}
    except KilnError as exc:
        raise HTTPException(422, str(exc).splitlines()) from None


@router.get("/api/training/configs")
def list_configs(store: StoreDep) -> list[dict[str, Any]]:
    return [c.to_dict() for c in store.configs()]


@router.get("/api/training/configs/{config_id}")
def get_config(config_id: str, store: StoreDep) -> dict[str, Any]:
    row = store.config(config_id)
    if row is None:
        raise HTTPException(404, f"no config {config_id}")
    return row.to_dict()


@router.delete("/api/training/configs/{config_id}", status_code=204)
def delete_config(config_id: str, store: StoreDep) -> None:
    if not store.delete_config(config_id):
        raise HTTPException(404, f"no config {config_id}")
