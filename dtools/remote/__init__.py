"""Search and retrieve another site's archive through the relay: catalogs, live queries,
retrieve requests, and what each peer is granted."""
