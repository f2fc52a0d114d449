# The two commands of the README. Both install what they need first (tools/setup.sh).
.PHONY: setup demo test

setup:
	bash tools/setup.sh

demo: setup
	bash tools/demo.sh

# Every tier, on every core (pytest-xdist); then, alone, the tests whose outcome rests on this
# machine's timings (a latency budget met on this host or the emulated Pi). The slowest tests are
# listed: what to look at when CI nears its 30 minutes.
test:
	bash tools/setup.sh --for-tests
	.venv/bin/python -m pytest -q -n auto --dist loadgroup -m "not serial" --durations=12
	.venv/bin/python -m pytest -q -m serial
