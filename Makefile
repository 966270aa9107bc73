# make test                  lint + unit tests + every Molecule scenario (SCENARIO=name: just that one)
# make sandbox               MLflow in a local systemd container at http://localhost:5000, deployed with site.yml
# make lock                  regenerate the role's hash locks for its pinned versions (needs PyPI)
# make lock MLFLOW_VERSION=x bump mlflow_version to x and lock it, in one step
# make bench                 the server (seed vs role) and the deploy, measured: bench/results/<date>.md
#
# MINICONDA=double   use the offline Miniconda test double (for places that cannot reach Anaconda)
# BASE_IMAGE=...     base of the test image (default ubuntu:24.04)
# UNSUPPORTED_IMAGE= an OS the role must refuse, for the bad-input scenario (default ubuntu:20.04)
# CA_BUNDLE=...      PEM bundle the containers must trust (TLS-intercepting proxy)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
MINICONDA ?= real
BASE_IMAGE ?= ubuntu:24.04
# An operating system the role does not support, for the bad-input scenario.
UNSUPPORTED_IMAGE ?= ubuntu:20.04
CA_BUNDLE ?=
SANDBOX_NAME ?= mlflow-sandbox
SANDBOX_PORT ?= 5000
DOUBLE := $(CURDIR)/files/test-doubles/Miniconda3-offline-test-double.sh

export PATH := $(BIN):$(PATH)
export MOLECULE_BASE_IMAGE := $(BASE_IMAGE)
export MOLECULE_UNSUPPORTED_IMAGE := $(UNSUPPORTED_IMAGE)
export MLFLOW_CA_BUNDLE := $(CA_BUNDLE)
ifeq ($(MINICONDA),double)
export MLFLOW_TEST_MINICONDA_INSTALLER := $(DOUBLE)
export MLFLOW_TEST_MINICONDA_SHA256 := $(shell sha256sum $(DOUBLE) | cut -d' ' -f1)
else ifneq ($(MINICONDA),real)
$(error MINICONDA must be 'real' or 'double', not '$(MINICONDA)')
endif

SCENARIO ?=
MLFLOW_VERSION ?=
# Releases the Molecule scenarios install besides the default (upgrades); their locks are test inputs.
TEST_MLFLOW_VERSIONS := 3.16.1 3.17.1

.PHONY: venv lint unit molecule test lock test-locks bench sandbox sandbox-destroy clean

venv: $(VENV)/.installed

# uv (pinned in requirements.txt) installs the rest in seconds (pip: about 80 s here); pip if uv fails.
$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$$(grep -E '^uv==' requirements.txt)"
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt \
	  || $(BIN)/pip install --quiet -r requirements.txt
	touch $@

lint: venv
	yamllint --strict .
	$(BIN)/python files/tools/lock.py check
	$(BIN)/python files/tools/role_docs.py --check
	ansible-lint

# The helpers and filter plugins, in seconds, before the scenarios.
unit: venv
	$(BIN)/python -m pytest -q tests/unit

molecule: venv
	molecule test $(if $(SCENARIO),--scenario-name $(SCENARIO),--all)

test: lint unit molecule

lock: venv
	$(BIN)/python files/tools/lock.py $(if $(MLFLOW_VERSION),bump $(MLFLOW_VERSION),generate)
	$(BIN)/python files/tools/role_docs.py

test-locks: venv
	for v in $(TEST_MLFLOW_VERSIONS); do \
	  $(BIN)/python files/tools/lock.py generate --mlflow $$v --python 3.11 --arch x86_64 --out-dir molecule/shared/locks; \
	done

bench: venv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r bench/requirements.txt \
	  || $(BIN)/pip install --quiet -r bench/requirements.txt
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

sandbox: venv
	docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) -t mlflow-sandbox:latest files/docker
	docker rm -f $(SANDBOX_NAME) >/dev/null 2>&1 || true
	docker run -d --name $(SANDBOX_NAME) --hostname $(SANDBOX_NAME) \
	  --cap-add SYS_ADMIN --cgroupns host --security-opt seccomp=unconfined \
	  -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
	  -p 127.0.0.1:$(SANDBOX_PORT):5000 mlflow-sandbox:latest /lib/systemd/systemd
	ansible-playbook -i inventory/sandbox/hosts.yml site.yml -e ansible_host=$(SANDBOX_NAME)
	@echo "MLflow is running at http://localhost:$(SANDBOX_PORT)  (make sandbox-destroy removes it)"

sandbox-destroy:
	docker rm -f $(SANDBOX_NAME)

clean: sandbox-destroy
	rm -rf $(VENV)
