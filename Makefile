# Set-up and entry points. Everything installs into $(VENV); override TORCH_SPEC for a CUDA build,
# e.g. make test TORCH_SPEC=torch (the default pins the CPU wheel this project is tested with).
# make demo ARGS="seed=1 selection.rule=uniform" passes config overrides to atpo-train.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRITON_36 := .cache/triton-3.6
TRANSFORMERS_517 := .cache/transformers-5.17

.PHONY: install test demo bench clean

$(STAMP): setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

# Triton 3.6.0, the GPU machine's version, beside the venv (cached): tests/test_compile.py compiles every kernel with it
$(TRITON_36)/triton: | $(STAMP)
	$(PY) -m pip install -q --target $(TRITON_36) "triton==3.6.0" "numpy<2.3"

# transformers 5.17.0, the GPU machine's version, beside the venv (cached): tests/test_transformers_517.py runs
# the model, native-loader and KV-cache tests with it (its own huggingface-hub; the venv's tokenizers fit both)
$(TRANSFORMERS_517)/transformers: | $(STAMP)
	$(PY) -m pip install -q --target $(TRANSFORMERS_517) --no-deps "transformers==5.17.0"
	$(PY) -m pip install -q --target $(TRANSFORMERS_517) "huggingface-hub>=1.5,<2"

install: $(STAMP) $(TRITON_36)/triton $(TRANSFORMERS_517)/transformers

test: $(STAMP) $(TRITON_36)/triton $(TRANSFORMERS_517)/transformers
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/atpo-train $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.bench_token_stats
	$(PY) -m benchmarks.bench_logprobs
	$(PY) -m benchmarks.bench_step_rows
	$(PY) -m benchmarks.bench_sampler

clean:
	rm -rf $(VENV) build *.egg-info
