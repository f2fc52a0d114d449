# The two commands of the README. Both install what they need first (tools/setup.sh).
.PHONY: setup demo test

setup:
	bash tools/setup.sh

demo: setup
	bash tools/demo.sh

test:
	bash tools/setup.sh --for-tests
	.venv/bin/python -m pytest -q
