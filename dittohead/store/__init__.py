"""The server side: the server root's layout, the append-only store, its index, ingest, fsck."""
