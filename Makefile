# The two commands a new user needs: `make demo` and `make test`.
# Both create (or reuse) .venv and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project is tested with; pyproject.toml keeps ranges.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv data demo test results clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST for the demo: found, else Debian's package (as root), else torchvision's download.
data: venv
	bash scripts/get_fashion_mnist.sh $(PY)

demo: data
	bash scripts/demo.sh $(PY)

test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

# docs/results.md (and any README results blocks) from benchmarks/results/*.jsonl, which the benchmark scripts append to.
results:
	$(PY) benchmarks/results.py render

clean:
	rm -rf $(VENV) runs
