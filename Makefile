# dittohead: set up, demo, test, benchmark and lint, on a fresh Debian machine or a developer's.
#
#   make demo         set up .venv and run the end-to-end demo (python -m dittohead.demo)
#   make test         set up .venv (and, as root, the Debian packages the tests use) and run pytest
#   make bench        set up .venv and the tools compared against, then run benchmarks/bench.py
#   make bench-scale  set up .venv (and GNU time), then run benchmarks/scale.py (dittohead at scale)
#   make bench-sftp   set up .venv and OpenSSH, then run benchmarks/sftp.py (sync over SSH, as root)
#   make bench-mount  set up .venv, FUSE, restic and borg, then run benchmarks/mount.py (the mount)
#   make bench-watch  set up .venv, then run benchmarks/watch.py (the watch daemon: latency, throughput)
#   make lint         ruff check and mypy
#   make clean        remove caches and the demo's and benchmarks' output (distclean: .venv too)
#
# Extra arguments: make test PYTEST_ARGS='-k ingest -x'; make demo DEMO_ARGS='--dir /tmp/d';
# make bench-scale SCALE_ARGS='--scale 0.1'; make bench-sftp SFTP_ARGS='--scale 0.25';
# make bench-mount MOUNT_ARGS='--scale 0.1 --scale-1m 0.1'; make bench-watch WATCH_ARGS='--scale 0.25'.
# Nothing here reads standard input: safe in CI, as root, with no terminal.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check --no-input

# Debian packages, installed only when run as root and only when one is missing.
# fuse3: the FUSE mount tests; openssh-server and openssh-client (ssh-keygen, ssh-agent): the SFTP
# transport tests against a real sshd.
TEST_DEBS ?= fuse3 openssh-server openssh-client
# The tools the benchmarks compare dittohead with.
BENCH_DEBS ?= rsync restic borgbackup
# GNU time: scale.py measures each command's peak RSS with /usr/bin/time -f %M.
SCALE_DEBS ?= time
# sftp.py runs a private sshd and compares dittohead with OpenSSH's sftp and rsync over ssh.
SFTP_DEBS ?= openssh-server openssh-client rsync
# mount.py mounts with dittohead (fuse3), restic and borg; borg mount needs python3-llfuse, which
# borgbackup only recommends (install-debs leaves recommends out).
MOUNT_DEBS ?= fuse3 restic borgbackup python3-llfuse

PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
SCALE_ARGS ?=
SFTP_ARGS ?=
MOUNT_ARGS ?=
WATCH_ARGS ?=
# Set to 1 to accept pytest's exit code 5 ("no tests were collected") as success.
NO_TESTS_OK ?=

# Stamps live inside .venv, so removing .venv re-does everything.
TEST_STAMP := $(VENV)/.installed-test
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: help setup demo test bench bench-scale bench-sftp bench-mount bench-watch lint clean distclean \
	system-deps bench-deps scale-deps sftp-deps mount-deps

help:
	@sed -n '3,15s/^# \{0,1\}//p' Makefile

# --- the virtualenv -----------------------------------------------------------------------

$(VPY):
	@echo "==> creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV) || { \
	  rm -rf $(VENV); \
	  echo "make: could not create $(VENV); on Debian: apt-get install python3-venv" >&2; \
	  exit 1; }

# Re-done whenever pyproject.toml changes. The editable install is in setuptools' "compat"
# mode: the checkout goes on sys.path through a .pth file, as a regular install would put the
# package there. The default mode adds an import hook that loads pathlib and more at every
# start, 25-45 ms with a cold cache, which the benchmarks would count against dittohead.
EDITABLE := --config-settings editable_mode=compat
$(TEST_STAMP): pyproject.toml | $(VPY)
	@echo "==> installing dittohead and its test dependencies into $(VENV)"
	$(PIP) install -q $(EDITABLE) -e '.[test]'
	@touch $@

$(DEV_STAMP): pyproject.toml | $(VPY)
	@echo "==> installing dittohead and its development tools into $(VENV)"
	$(PIP) install -q $(EDITABLE) -e '.[dev]'
	@touch $@

setup: $(TEST_STAMP)

# --- Debian packages ----------------------------------------------------------------------

# $(call install-debs,PACKAGES): as root, apt-get install whichever of PACKAGES is missing
# (apt-get update once, first); as anyone else, or with no apt-get, only say what is missing (the
# tests and benchmarks that need a missing package skip it). Cheap when all are installed: one
# dpkg -s per package.
define install-debs
	@missing=(); \
	for p in $(1); do \
	  [[ "$$(dpkg -s "$$p" 2>/dev/null)" == *"Status: install ok installed"* ]] || missing+=("$$p"); \
	done; \
	if (( $${#missing[@]} == 0 )); then exit 0; fi; \
	if ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ]; then \
	  echo "make: not installed: $${missing[*]} (not root, or no apt-get: what needs them skips)"; \
	else \
	  echo "==> apt-get install $${missing[*]}"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get -q -o DPkg::Lock::Timeout=120 update </dev/null; \
	  apt-get -q -y -o DPkg::Lock::Timeout=120 install --no-install-recommends \
	    "$${missing[@]}" </dev/null; \
	fi
endef

system-deps:
	$(call install-debs,$(TEST_DEBS))

bench-deps:
	$(call install-debs,$(BENCH_DEBS))

scale-deps:
	$(call install-debs,$(SCALE_DEBS))

sftp-deps:
	$(call install-debs,$(SFTP_DEBS))

mount-deps:
	$(call install-debs,$(MOUNT_DEBS))

# --- what people run ----------------------------------------------------------------------

demo: $(TEST_STAMP)
	$(VPY) -m dittohead.demo $(DEMO_ARGS)

test: system-deps $(TEST_STAMP)
	@rc=0; $(VPY) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ "$$rc" = 5 ] && [ -n "$(NO_TESTS_OK)" ]; then \
	  echo "make: pytest collected no tests (accepted: NO_TESTS_OK is set)"; rc=0; \
	fi; \
	exit $$rc

# Byte-compiled first, as installing a wheel does: where PYTHONDONTWRITEBYTECODE is set, an
# editable checkout is otherwise compiled anew at every command's start (20-40 ms, cold).
bench: bench-deps $(TEST_STAMP)
	$(VPY) -m compileall -q dittohead
	$(VPY) benchmarks/bench.py $(BENCH_ARGS)

# dittohead alone on a study of 1M versions and one of 10,000 submissions (benchmarks/README.md,
# "At scale"); GNU time gives each command's peak RSS.
bench-scale: scale-deps $(TEST_STAMP)
	$(VPY) -m compileall -q dittohead
	$(VPY) benchmarks/scale.py $(SCALE_ARGS)

# dittohead's sync and SFTP transport against OpenSSH's sftp and rsync over ssh, on a private
# sshd of its own on 127.0.0.1 (benchmarks/README.md, "Over SSH (sftp.py)"); needs root.
bench-sftp: sftp-deps $(TEST_STAMP)
	$(VPY) -m compileall -q dittohead
	$(VPY) benchmarks/sftp.py $(SFTP_ARGS)

# dittohead mount against restic mount and borg mount on bench.py's study, then dittohead alone
# on scale.py's study of 1M versions (benchmarks/README.md, "The mount (mount.py)").
bench-mount: mount-deps $(TEST_STAMP)
	$(VPY) -m compileall -q dittohead
	$(VPY) benchmarks/mount.py $(MOUNT_ARGS)

# The watch daemon as its own account, an uploader syncing into it: commit to receipt of a small
# submission (median of many), and ingest throughput of bench.py's study (docs/watch.md,
# "Figures").
bench-watch: $(TEST_STAMP)
	$(VPY) -m compileall -q dittohead
	$(VPY) benchmarks/watch.py $(WATCH_ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy dittohead

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist demo-run bench-run
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
