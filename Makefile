# Telehealth Bridge. `make run` and `make test` do all their own set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

NODE_STAMP := web_client/node_modules/.package-lock.json
OIDC_STAMP := tests/oidc_provider/node_modules/.package-lock.json

.PHONY: run fleet test lint bench-signaling bench-relay bench-recorder bench-abuse system-deps test-system-deps clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || (apt-get update && apt-get install -y python3-venv)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The web client's npm packages (socket.io-client), exactly as the committed lockfile says.
$(NODE_STAMP): web_client/package-lock.json | system-deps
	cd web_client && npm ci --no-audit --no-fund

# The OpenID Connect provider the single sign-on test starts (oidc-provider), from its lockfile.
$(OIDC_STAMP): tests/oidc_provider/package-lock.json | system-deps
	cd tests/oidc_provider && npm ci --no-audit --no-fund

system-deps:
	@command -v npm >/dev/null || (apt-get update && apt-get install -y nodejs npm)

# Browser tests use Debian's Chromium (never a downloaded browser); the TURN, reverse-proxy and
# live-state and store tests start Debian's coturn, nginx, redis-server and PostgreSQL themselves
# (never as system services; PostgreSQL as an unprivileged user in a temporary directory).
test-system-deps: system-deps
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	@test -x /usr/bin/turnserver || (apt-get update && apt-get install -y coturn)
	@test -x /usr/sbin/nginx || (apt-get update && apt-get install -y nginx-light)
	@test -x /usr/bin/redis-server || (apt-get update && apt-get install -y redis-server)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (mkdir -p /etc/postgresql-common/createcluster.d \
		&& echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/telehealth.conf \
		&& apt-get update && apt-get install -y postgresql)

## run: the product on its embedded defaults (no Redis, no external services)
run: $(STAMP) $(NODE_STAMP)
	$(BIN)/telehealth serve

## fleet: a local fleet on 127.0.0.1 (docs/fleet.md): redis-server, PostgreSQL, two `serve`
## nodes, two relays and nginx in front; prints the sign-in links; Ctrl-C stops everything.
## Debian's redis-server, postgresql and nginx-light are installed when missing; the fleet
## starts its own on free ports, configs, data and logs in var/fleet (never a system service).
fleet: $(STAMP) $(NODE_STAMP)
	@test -x /usr/sbin/nginx || (apt-get update && apt-get install -y nginx-light)
	@test -x /usr/bin/redis-server || (apt-get update && apt-get install -y redis-server)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (mkdir -p /etc/postgresql-common/createcluster.d \
		&& echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/telehealth.conf \
		&& apt-get update && apt-get install -y postgresql)
	$(BIN)/python -m tests.fleet_processes

## test: lint, type-check and the whole test suite
test: $(STAMP) $(NODE_STAMP) $(OIDC_STAMP) test-system-deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench-signaling: $(STAMP)
	$(BIN)/python bench/signaling_load.py --sites 1000 --rate 50

bench-relay: $(STAMP)
	$(BIN)/python bench/relay_fanout.py

bench-recorder: $(STAMP)
	$(BIN)/python bench/recorder_load.py

bench-abuse: $(STAMP)
	$(BIN)/python bench/abuse_load.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache web_client/node_modules tests/oidc_provider/node_modules
