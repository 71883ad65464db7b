"""The watcher daemon (``dittohead watch``): ingest as uploads land, tell people what happened,
and run for months.

    events       what happened, as one record the log, the notifications and the hooks share
    config       ROOT/daemon/watch.json: what the admin sets for the daemon (read again on SIGHUP)
    watcher      the main loop: inotify (watchdog) and a periodic rescan, one worker process per
                 submission, signals, the daemon's state (ROOT/daemon/state.json)
    notify       notifications through Apprise URLs (e-mail and the rest), retried from an outbox
    disks        filesystems and quotas crossing thresholds: once per crossing
    housekeeping abandoned staging folders, have-segment compaction, held-back retries
    hooks        a study's command, run after each of its ingests

ROOT/daemon/ (0700, the daemon's account's) holds what the daemon keeps between runs: its lock
(one daemon per server root), its configuration, its state, the outbox, the hooks due. Nothing
there is part of the store's history; losing it loses no data.
"""
