# One command for each job; each does its own set-up on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
MODELS ?= exported
PORT ?= 50051
USER_ID ?= 42

.PHONY: install postgres browser demo test test-fast lint protos train evaluate serve clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[serve,train,test]'  # shows its progress: the first install downloads TensorFlow
	touch $@

# Regenerate the committed stubs (tests check they match the .proto). They are generated from the
# proto at its installed path, recsys/v1/recommender.proto, so they import recsys.v1.
protos: install
	@tmp=$$(mktemp -d) && mkdir -p $$tmp/recsys/v1 && cp protos/recommender.proto $$tmp/recsys/v1/ && \
	$(PY) -m grpc_tools.protoc -I$$tmp --python_out=$$tmp --grpc_python_out=$$tmp --pyi_out=$$tmp \
	  $$tmp/recsys/v1/recommender.proto && cp $$tmp/recsys/v1/recommender_pb2* protos/ && rm -rf $$tmp

train: install
	$(PY) -m recsys.export train --out $(MODELS)

evaluate: install
	$(PY) -m recsys.export evaluate --models $(MODELS)

serve: install
	$(PY) -m recsys.server --models $(MODELS) --port $(PORT)

# Train (only if no export exists), serve on free loopback ports (no interaction store), ask for
# user 42's recommendations with their reasons and for the movies most like Toy Story. On a
# terminal the server then stays up for its page (Ctrl-C stops it). The clients call the port this
# server logs it listens on, so no other server can answer for it.
demo: install
	@if [ -z "$$(ls $(MODELS)/retrieval 2>/dev/null | grep -E '^[0-9]+$$')" ]; then $(PY) -m recsys.export train --out $(MODELS); fi
	@$(PY) -m recsys.server --models $(MODELS) --port 0 --http-port 0 --host 127.0.0.1 --interactions-db none > .demo-server.log 2>&1 & \
	server_pid=$$!; \
	trap 'kill -TERM $$server_pid 2>/dev/null; wait $$server_pid 2>/dev/null' EXIT; \
	port=; for _ in $$(seq 600); do \
	  port=$$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\) .*/\1/p' .demo-server.log); \
	  [ -n "$$port" ] && break; \
	  kill -0 $$server_pid 2>/dev/null || break; sleep 0.1; \
	done; \
	[ -n "$$port" ] || { echo "the demo's server did not start:"; cat .demo-server.log; exit 1; }; \
	$(PY) -m recsys.client recommend --target 127.0.0.1:$$port --user $(USER_ID) --wait 120 -k 5 || { cat .demo-server.log; exit 1; }; \
	$(PY) -m recsys.client similar --target 127.0.0.1:$$port --item 1 -k 5 || { cat .demo-server.log; exit 1; }; \
	url=$$(sed -n 's/.*HTTP and JSON on \(http:[^ ]*\) .*/\1/p' .demo-server.log); \
	if [ -t 0 ]; then echo; echo "Try it in a browser: $$url (Ctrl-C stops the server)"; wait $$server_pid; \
	else echo; echo "The page was at $$url (run make demo on a terminal to keep it up)"; fi

lint: install
	$(PY) -m ruff check .

# PostgreSQL's server binaries (initdb, pg_ctl) for the interaction store's tests, which start a
# throwaway server of their own: Debian's postgresql package, installed where missing.
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql package for the store tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# Debian's chromium and its chromedriver, for the test that drives the HTTP face's page, where missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver for the page's test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# Everything, the quality floors on the real data included (trains the default preset twice).
test: lint postgres browser
	$(PY) -m pytest

# Unit tests and the service contract end to end, on a synthetic data set: no data set needed; two
# pytest workers (pytest-xdist), as nothing trains beside them.
test-fast: lint postgres browser
	$(PY) -m pytest -m "not slow and not real_data" -n 2

clean:
	rm -rf $(VENV) .demo-server.log
