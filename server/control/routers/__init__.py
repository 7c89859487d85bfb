"""The control service's HTTP endpoints, one router per resource (FastAPI's "bigger applications" layout).

``runs``, ``nodes``, ``users`` and ``audit`` are the JSON API under ``/api`` (roles: reviewer reads
runs and reports; operator also starts, stops and plans runs and lists nodes; admin also manages
users, revokes nodes and reads the audit log; no token: 401; a role lacking permission: 403);
``dashboard`` is the browser's pages and forms. Every handler authenticates through
``server.control.deps`` and acts through ``server.control.service``; errors become responses in
``server.control.app``.
"""
