# The two commands of the README. Both install what is missing first and are idempotent.
.PHONY: run test setup setup-test lint typecheck unit

ARGS ?=

run:
	@scripts/setup.sh run
	.venv/bin/tlsgate run $(ARGS)

test:
	@scripts/setup.sh test
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	scripts/typecheck.sh
	.venv/bin/python -m pytest

setup:
	@scripts/setup.sh run

setup-test:
	@scripts/setup.sh test
