# Convenience aliases for dev.py (which needs only Python and pip).
PYTHON ?= python3
.PHONY: setup demo test
setup:
	$(PYTHON) dev.py setup
demo:
	$(PYTHON) dev.py demo
test:
	$(PYTHON) dev.py test
