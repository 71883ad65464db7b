"""dittohead: a secure one-way file synchronizer that never forgets.

Collectors sync study folders from lab PCs into a drop-box inbox; the server ingests each
submission into an append-only, content-addressed store where every path keeps every version.
"""

__version__ = "0.3.0"
