"""stimctl: the StimNet researcher/operator CLI and Python client."""

from stimctl.client import AsyncClient, Client, ClientConfig, ClientError
from stimctl.results import QueryAnswer

__all__ = ["AsyncClient", "Client", "ClientConfig", "ClientError", "QueryAnswer"]
