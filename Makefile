# make test     lint + every Molecule scenario
# make sandbox  MLflow in a local systemd container at http://localhost:5000, deployed with site.yml
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

.PHONY: venv lint molecule test sandbox sandbox-destroy clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

lint: venv
	yamllint --strict .
	$(BIN)/python files/tools/check_docs.py
	ansible-lint

molecule: venv
	molecule test --all

test: lint molecule

sandbox: venv
	docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) -t mlflow-sandbox:latest files/docker
	docker rm -f $(SANDBOX_NAME) >/dev/null 2>&1 || true
	docker run -d --name $(SANDBOX_NAME) --hostname $(SANDBOX_NAME) \
	  --cap-add SYS_ADMIN --cgroupns host --security-opt seccomp=unconfined \
	  -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
	  -p 127.0.0.1:$(SANDBOX_PORT):5000 mlflow-sandbox:latest /lib/systemd/systemd
	ansible-playbook -i inventory/sandbox/hosts.yml site.yml
	@echo "MLflow is running at http://localhost:$(SANDBOX_PORT)  (make sandbox-destroy removes it)"

sandbox-destroy:
	docker rm -f $(SANDBOX_NAME)

clean: sandbox-destroy
	rm -rf $(VENV)
