"""Path parameters the API and the dashboard share, validated before any handler runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam

RunId = Annotated[int, PathParam(ge=1, le=2**53, description="FedGuard run id (runs.run_id in the run store)")]
Name = Annotated[str, PathParam(min_length=1, max_length=64)]
