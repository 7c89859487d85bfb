"""``/api/users``: list, add and revoke the people who may use the control service (admin, audited)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from server.control.auth import Principal
from server.control.deps import Admin, Svc, require_role
from server.control.params import Name
from server.control.service import user_dict

AsUserAdd = Annotated[Principal, Depends(require_role("admin", "user.add"))]
AsUserRevoke = Annotated[Principal, Depends(require_role("admin", "user.revoke"))]


class AddUser(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    role: Literal["reviewer", "operator", "admin"]


router = APIRouter(prefix="/api/users", tags=["users"])


@router.get("", summary="every user, active and revoked (admin)")
def list_users(p: Admin, svc: Svc) -> list[dict[str, Any]]:
    return [user_dict(u) for u in svc.users.list()]


@router.post("", status_code=201, summary="add a user; the token is in this response only (admin)")
def add_user(body: AddUser, p: AsUserAdd, svc: Svc) -> Any:
    user, token = svc.add_user(p, body.name, body.role)
    return {**user_dict(user), "token": token}


@router.post("/{name}/revoke", summary="revoke a user's token at once (admin)")
def revoke_user(name: Name, p: AsUserRevoke, svc: Svc) -> Any:
    return user_dict(svc.revoke_user(p, name))
