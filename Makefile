# Two commands set everything up on a fresh machine:  `make swap`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= sd2.1-base
PROMPT ?= a photo of an astronaut riding a horse on mars

.PHONY: test test-all mutants run weights bench toy toy-stages toy-unet clean swap toy-weights eval-toy

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the CPU wheel on this machine kind's disk.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)  ## the suite CI runs (slow and GPU tests skipped)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)  ## everything, slow tests included
	$(BIN)/python -m pytest -q

mutants: $(STAMP)  ## plant each bug of tests/mutants.py in a copy; every one must fail a test
	$(BIN)/python tests/mutants.py

run: $(STAMP)  ## text-to-image with the SD 2.1 weights in weights/$(MODEL)
	$(BIN)/python -m sd "$(PROMPT)" --model $(MODEL) --weights weights/$(MODEL) -o out/sample.png $(T)

weights: $(STAMP)  ## download SD weights (MODEL=sd2.1-base, sd2.1, sd1.5, sd1.4) into weights/$(MODEL)
	$(BIN)/python weights/fetch.py $(MODEL)

# Photoswap. On the toy model (a folder whose MODEL says preset=toy; weights/toy by default):
# python -m toy swap: DreamBooth on TOY_CONCEPT (cached in out/toy/concepts), held-out scene
# SCENE, its null-text inversion, photoswap / p2p / none, grid and metrics into out/swap; empty:
# toy swap's defaults, the benchmark's median swap (EVAL.md). On any other model: python -m
# photoswap with a word swap (SWAP_PROMPT, SUBJECT, CONCEPT).
SWAP_WEIGHTS ?= weights/toy
TOY_CONCEPT ?=
SCENE ?=
SWAP_PROMPT ?= a photo of a cat
SUBJECT ?= cat
CONCEPT ?= sks dog
SWAP_ARGS ?=
# torch threads for every command below (empty: sd/cli.py's policy, 1 for the toy model)
THREADS ?=
T = $(if $(THREADS),--threads $(THREADS))

toy-weights:
	@test -f "$(SWAP_WEIGHTS)" -o -e "$(SWAP_WEIGHTS)/unet" || { \
	  echo "make swap: no model at $(SWAP_WEIGHTS)/ (no unet/ there). Provide the toy model there (a" \
	       "diffusers-layout folder: unet/, vae/, text_encoder/ with their config.json and" \
	       "safetensors, and MODEL saying preset=toy; git checkout weights/toy restores the committed" \
	       "one, make toy retrains it), or point SWAP_WEIGHTS at one, or swap with SD 2.1:" \
	       "make weights, then make swap SWAP_WEIGHTS=weights/sd2.1-base SWAP_PROMPT='a photo of a" \
	       "cat' SUBJECT=cat CONCEPT='sks dog' (a DreamBooth'd folder, or add" \
	       "SWAP_ARGS='--embeds FILE')." >&2; \
	  exit 1; }

TOY_SWAP = $(BIN)/python -m toy swap --weights "$(SWAP_WEIGHTS)" \
  $(if $(TOY_CONCEPT),--concept $(TOY_CONCEPT)) $(if $(SCENE),--scene $(SCENE)) -o out/swap $(T) \
  $(SWAP_ARGS)
swap: toy-weights $(STAMP)  ## Photoswap into out/swap/ (images, grid.png, metrics or settings)
	@if grep -qs '^preset=toy' "$(SWAP_WEIGHTS)/MODEL"; then echo '$(TOY_SWAP)'; $(TOY_SWAP); \
	else set -x; $(BIN)/python -m photoswap "$(SWAP_PROMPT)" --subject $(SUBJECT) \
	  --concept "$(CONCEPT)" --weights "$(SWAP_WEIGHTS)" -o out/swap --heatmap --layout \
	  $(T) $(SWAP_ARGS); fi

EVAL_SCENES ?= 16
eval-toy: toy-weights $(STAMP)  ## the swap benchmark on the toy model into EVAL.md (~35 CPU min)
	$(BIN)/python -m toy evaluate --weights "$(SWAP_WEIGHTS)" --scenes $(EVAL_SCENES) $(T)

bench: $(STAMP)  ## CPU benchmarks against diffusers/transformers; results go to BENCHMARKS.md
	$(BIN)/python -m bench.modules

TOYRUN ?= out/toyrun
# make toy runs two jobs at a time, one torch thread each (TOY_JOBS, TOY_THREADS): the stages are
# too small to share cores well, and the VAE -> UNet chain, the long one, has the other core's
# jobs (judge, identity encoder, decoder) beside it. When that second chain has written its last
# file, the UNet stage takes the core it frees (TOY_ALONE_THREADS threads from then on).
TOY_JOBS ?= 2
TOY_THREADS ?= 1
TOY_ALONE_THREADS ?= 2
TOY_ARGS = --run $(TOYRUN) --threads $(TOY_THREADS)
TOY_UNET_ARGS = $(TOY_ARGS) --more-threads $(TOY_ALONE_THREADS) $(TOYRUN)/decoder.pt
toy: $(STAMP)  ## retrain the toy model from scratch into weights/toy (hours; resumable; weights/toy/README.md)
	$(MAKE) -j$(TOY_JOBS) toy-stages

# Two chains, one per job slot: the VAE then the UNet (stages 2 and 2b), the long one; the judge,
# then the identity encoder, then the decoder. The order-only links (after |) keep the second
# chain in line, so that when the VAE ends the UNet is the only job make can start beside the
# judge (make -j starts whatever is ready, not what is listed first).
toy-stages: toy-unet $(TOYRUN)/judge.pt $(TOYRUN)/decoder.pt $(TOYRUN)/identity.safetensors
	$(BIN)/python -m toy pretrain export --run $(TOYRUN) -o weights/toy

# Each stage resumes from its last checkpoint; vae.pt and decoder.pt are written when their
# stage ends; the UNet stages, rerun when done, only reload their last checkpoints.
$(TOYRUN)/vae.pt: | $(STAMP)
	$(BIN)/python -m toy pretrain vae $(TOY_ARGS)
$(TOYRUN)/decoder.pt: $(TOYRUN)/vae.pt | $(TOYRUN)/identity.safetensors
	$(BIN)/python -m toy pretrain decoder $(TOY_ARGS)
toy-unet: $(TOYRUN)/vae.pt
	$(BIN)/python -m toy pretrain unet $(TOY_UNET_ARGS)
	$(BIN)/python -m toy pretrain unet-more $(TOY_UNET_ARGS)

# The measuring instruments (their files are their stamps: delete one to retrain it).
$(TOYRUN)/judge.pt: | $(STAMP)
	$(BIN)/python -m toy judge -o $@ --threads $(TOY_THREADS)
$(TOYRUN)/identity.safetensors: | $(STAMP) $(TOYRUN)/judge.pt
	$(BIN)/python -m toy identity -o $@ --threads $(TOY_THREADS)

clean:
	rm -rf $(VENV) out .pytest_cache
