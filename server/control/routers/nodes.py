"""``/api/nodes``: enrolled nodes and whether they are online (operator); revoke one (admin, audited)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from server.control.auth import Principal
from server.control.deps import Operator, Svc, require_role
from server.control.params import Name

AsNodeRevoke = Annotated[Principal, Depends(require_role("admin", "node.revoke"))]

router = APIRouter(prefix="/api/nodes", tags=["nodes"])


@router.get("", summary="enrolled nodes and whether they are online (operator)")
def list_nodes(p: Operator, svc: Svc) -> list[dict[str, Any]]:
    return svc.nodes()


@router.post("/{name}/revoke", summary="unregister a node: it can no longer join (admin)")
def revoke_node(name: Name, p: AsNodeRevoke, svc: Svc) -> Any:
    return svc.revoke_node(p, name)
