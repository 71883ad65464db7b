"""The client: scan a study folder, chunk and hash what changed, upload what the server lacks."""
