"""The read-only FUSE mount: a thin adapter over the view (dittohead/view.py).

``ops`` holds what the mount answers (attributes, listings, reads), in plain Python, testable
without FUSE; ``mount`` runs it with mfusepy over libfuse (3 where installed, else 2), and is
the only module here that imports mfusepy. Named ``dittohead.fuse``, not ``fuse``: a top-level
``fuse`` would clash with fusepy's and python-fuse's module.
"""
