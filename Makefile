# certgrab: developer targets. Plain `make` lists them.
#
# Everything runs from a fresh clone: `make test` makes its own virtual
# environment with pytest; the other targets need only python3 and openssl
# (and nginx for `make bench`).

PYTHON      = python3
VENV        = .venv
BUILD       = build
PYTEST_ARGS ?=
# Debian python3-minimal roots for tests/test_minimal_hosts.py (see tests/make_roots.sh).
CERTGRAB_ROOTS ?= /var/cache/certgrab-roots

.PHONY: help test venv demo bench lint man roots clean distclean

help:
	@echo "make test       run the test suite (first run creates $(VENV) and installs pytest);"
	@echo "                pass pytest options with PYTEST_ARGS='-x -k ipv6'"
	@echo "make demo       fetch a chain from a local openssl s_server and write --out-dir files"
	@echo "make bench      measure speed against a bare handshake, the system store, and 100 ms RTT,"
	@echo "                and 10,240 sources on nginx against bare handshakes (CPU, memory);"
	@echo "                one row alone with BENCH_ARGS='--only f'"
	@echo "make lint       pyflakes over certgrab.py and tests/, then byte-compile certgrab.py"
	@echo "                under every python3.6 ... python3.13 found"
	@echo "make man        regenerate docs/certgrab.1 from certgrab.py (after changing an option)"
	@echo "make roots      build the Debian 12/11 python3-minimal roots (root, debootstrap) in"
	@echo "                CERTGRAB_ROOTS=$(CERTGRAB_ROOTS)"
	@echo "make clean      remove $(BUILD)/ and Python caches"
	@echo "make distclean  clean, and remove $(VENV)/"

test: venv
	CERTGRAB_ROOTS=$(CERTGRAB_ROOTS) $(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

# Create the venv with the default python3 and install tests/requirements.txt into it,
# again whenever that file changes (the stamp is the venv's copy of it).
venv: $(VENV)/requirements.txt

$(VENV)/requirements.txt: tests/requirements.txt
	@[ -x $(VENV)/bin/python ] || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing tests/requirements.txt into $(VENV)"
	@$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	@cp tests/requirements.txt $@

demo:
	sh tests/demo.sh $(BUILD)/demo $(PYTHON)

bench:
	$(PYTHON) tests/bench.py $(BENCH_ARGS)

# pyflakes over certgrab.py and tests/ (from the test venv): any finding fails; no code in
# strings in certgrab.py. Then
# py_compile certgrab.py with each interpreter, the .pyc going to $(BUILD)/lint.
# Interpreters come from ~/.pyenv/versions (or $PYENV_ROOT), else from PATH.
lint: venv
	$(VENV)/bin/python -m pyflakes certgrab.py tests
	@! grep -nE 'exec\(|compile\(|load_section|_SECTION|setattr\(Certificate' certgrab.py || \
	    { echo "lint: certgrab.py must be plain Python: no code compiled from strings"; exit 1; }
	@mkdir -p $(BUILD)/lint; found=0; failed=0; \
	for v in 6 7 8 9 10 11 12 13; do \
	    py=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.$$v.*/bin/python3.$$v 2>/dev/null | sort -V | tail -n 1); \
	    [ -n "$$py" ] || py=$$(command -v python3.$$v 2>/dev/null) || true; \
	    if [ -z "$$py" ]; then printf 'python3.%-3s not found, skipped\n' $$v; continue; fi; \
	    found=$$((found + 1)); \
	    if $$py -c 'import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)' \
	        certgrab.py $(BUILD)/lint/certgrab.3$$v.pyc; then printf 'python3.%-3s ok    %s\n' $$v $$py; \
	    else printf 'python3.%-3s FAIL  %s\n' $$v $$py; failed=$$((failed + 1)); fi; \
	done; \
	[ $$found -gt 0 ] || { echo "lint: no python3.6 ... python3.13 found"; exit 1; }; \
	[ $$failed -eq 0 ]

# The man page, from the option table that builds --help and the module docstring
# (tests/make_man.py). It is committed; tests/test_docs.py fails while it is out of date.
man:
	$(PYTHON) tests/make_man.py docs/certgrab.1

roots:
	CERTGRAB_ROOTS=$(CERTGRAB_ROOTS) sh tests/make_roots.sh

clean:
	rm -rf $(BUILD) .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
