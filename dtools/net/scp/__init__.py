"""dserve's SCP: one Server (server.py) made of services, one module each: storage.py
(C-STORE), query.py (C-FIND), retrieve.py (C-MOVE, C-GET); statuses.py has their DIMSE statuses."""

from .server import Server, ServerSettings

__all__ = ["Server", "ServerSettings"]
