# tandem: a thin wrapper over CMake and the set-up scripts.
#   make deps    Debian packages and the Python venv for tests (idempotent)
#   make         Release build; binaries in build/bin/
#   make model   fetch and verify the default model into $TANDEM_HOME/models
#   make demo    set-up, build, model, then a local cluster (tandem up) and one streamed answer
#   make test    set-up, Release and ASan+UBSan builds, every test on both
#   make bench   tandem bench engine against llama.cpp on this machine
#   make test-quants  tandem on GGUF files llama.cpp writes (Q4_K_M, IQ4_XS, ...)
#   make quant-quality  perplexity of tandem's quantizer against llama.cpp's
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BUILD ?= build
ASAN_BUILD ?= build-asan
TANDEM_HOME ?= $(HOME)/.cache/tandem
export TANDEM_HOME
FUZZ_SECONDS ?= 60

.PHONY: all build deps model demo test test-release test-asan test-python fuzz bench test-quants quant-quality clean format

all: build

build:
	@scripts/check-deps.sh
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD) -j $(JOBS)

deps:
	scripts/deps.sh

model: deps
	scripts/fetch-model.sh

demo: deps model build
	scripts/demo.sh

$(ASAN_BUILD)/CMakeCache.txt:
	CC=clang cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DTANDEM_SANITIZE=ON -DTANDEM_FUZZ=ON -DTANDEM_CUDA=OFF

test: deps model build
	CC=clang cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DTANDEM_SANITIZE=ON -DTANDEM_FUZZ=ON -DTANDEM_CUDA=OFF
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	scripts/run-tests.sh $(BUILD) $(ASAN_BUILD) $(FUZZ_SECONDS)

bench: deps model build
	scripts/bench.sh $(BUILD)

test-quants: deps model build
	scripts/test-quant-files.sh $(BUILD)

quant-quality: test-quants
	scripts/quant-quality.sh $(BUILD)

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
