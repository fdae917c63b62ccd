# Every target calls nox (`nox -l` lists the sessions); nothing else happens here.
NOX ?= nox
# Every benchmark spec; `make reproduce SPECS=experiments/seed-fwd.yaml` runs one.
SPECS ?= $(sort $(wildcard experiments/*.yaml))
IMAGE ?= flash-tt-attn
WORKDIR := /workspace/flash_tt_attn

.PHONY: reproduce figures test lint docker-build docker-reproduce

## reproduce: on a GPU machine, everything: GPU tests, gradchecks, every benchmark spec, figures.
## Rerun it to resume: suites that passed and points measured at this commit are not run again.
reproduce:
	FLASH_TT_ATTN_RESUME=1 $(NOX) -s gpu_tests
	FLASH_TT_ATTN_RESUME=1 $(NOX) -s gradcheck
	$(NOX) -s bench -- $(SPECS)
	$(NOX) -s figures

## figures: redraw paper_figures/ from experiments/logs/ (CPU is enough)
figures:
	$(NOX) -s figures

## test: the CPU test suite (Triton interpreter + PyTorch reference)
test:
	$(NOX) -s tests

## lint: ruff on the repository, hadolint on docker/Dockerfile, CITATION.cff validation
lint:
	$(NOX) -s lint docker_lint cff

## docker-build: build docker/Dockerfile (context: the repository root)
docker-build:
	docker build -f docker/Dockerfile -t $(IMAGE) .

## docker-reproduce: run `make reproduce` in the image, on this checkout (logs and figures land here)
docker-reproduce: docker-build
	docker run --rm --gpus all --user "$$(id -u):$$(id -g)" \
		-v "$(CURDIR):$(WORKDIR)" -w $(WORKDIR) $(IMAGE) make reproduce
