# The single entry point. `make run` and `make test` each do all set-up on a fresh machine:
# a virtual environment in .venv, llama-cpp-python built from source with RPC, edgelm with its
# native kernels. A second run reuses all of it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgelm-installed
PROMPT ?= class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n
ARGS   ?= -n 64 --temp 0

.PHONY: run test setup models default-model exit-heads clean

run: $(STAMP)
	$(BIN)/edgelm run -p "$$(printf '%b' '$(PROMPT)')" $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py scripts/setup_llama_cpp.sh $(wildcard native/*.c native/*.h native/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	scripts/setup_llama_cpp.sh $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

# Retrain the reference models from scratch (about 30 minutes on 2 cores), then rebuild the bundled GGUF.
models: $(STAMP)
	$(BIN)/python scripts/train_reference.py tokenizer
	$(BIN)/python scripts/train_reference.py model --size tiny
	$(BIN)/python scripts/train_reference.py model --size small
	$(MAKE) default-model

default-model: $(STAMP)
	$(BIN)/edgelm convert models/small -o edgelm/models/edgelm-small-q8_0.gguf --outtype q8_0 --name edgelm-small \
		--early-exit 4

# Early-exit heads for self-speculative decoding (about 35 minutes on one thread): exit norms for the frozen
# models/small, then models/small-ee, small trained on with exit losses at layers 4, 6 and 8.
exit-heads: $(STAMP)
	$(BIN)/python scripts/train_exit.py exit-norm --model models/small --layers 2 4 6 8 --steps 150 --batch 4 --lr 2e-2
	$(BIN)/python scripts/train_exit.py layerskip --model models/small --out models/small-ee --exit-layers 4 6 8 \
		--steps 360 --batch 4 --lr 2e-5 --warmup 40 --exit-weight 0.2 --eval-every 60
	$(BIN)/python scripts/train_exit.py exit-block --model models/small-ee --layer 4
	$(MAKE) default-model

clean:
	rm -rf $(VENV) build *.egg-info edgelm/_native*.so
