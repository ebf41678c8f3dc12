"""tandem's logits and greedy output against the numpy reference (reference.py).

For each prompt:
  - the last position's logits from `tandem logits` must be within a relative
    L2 error of 2e-2 of the reference's, with the same argmax;
  - 32 greedy tokens from `tandem generate --temp 0` must equal the
    reference's; a divergence is allowed only where the reference's top two
    logits are within 0.5% of each other (a near tie), and then only the
    tokens before it are compared.

Environment: TANDEM_BIN (default <repo>/build/bin/tandem), TANDEM_MODEL
(default $TANDEM_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf). Either one
missing skips the tests with the reason.
"""

import json
import os
import subprocess

import numpy as np
import pytest

import reference
from conftest import REPO

MAX_REL_L2 = 2e-2
NEAR_TIE = 5e-3  # top two reference logits within 0.5% of the top one
N_GREEDY = 32
TIMEOUT_S = 600

# Chosen so that the reference's top two logits at each prompt's last position
# are well apart (by 6%, 5% and 17%): the argmax check is then no coin toss.
PROMPTS = {
    "chat": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "english": "The old lighthouse keeper climbed the stairs every evening, and on the night of the storm he",
    "code": "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return",
}


@pytest.fixture(scope="session")
def tandem_bin():
    path = os.environ.get("TANDEM_BIN") or os.path.join(REPO, "build", "bin", "tandem")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.skip("no tandem binary at %s (build it with `make`, or set TANDEM_BIN)" % path)
    return path


@pytest.fixture(scope="session")
def model_path():
    path = os.environ.get("TANDEM_MODEL") or reference.default_model_path()
    if not os.path.isfile(path):
        pytest.skip("no model at %s (fetch it with `make model`, or set TANDEM_MODEL)" % path)
    return path


@pytest.fixture(scope="session")
def ref_model(model_path):
    return reference.load(model_path)


def run_tandem(tandem_bin, args, stdin_text=None):
    """Runs tandem and returns its stdout; fails the test with its stderr."""
    proc = subprocess.run(
        [tandem_bin] + args,
        input=stdin_text.encode("utf-8") if stdin_text is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=TIMEOUT_S,
    )
    if proc.returncode != 0:
        pytest.fail(
            "tandem %s exited with %d:\n%s"
            % (" ".join(args[:1]), proc.returncode, proc.stderr.decode("utf-8", "replace")[-3000:])
        )
    return proc.stdout.decode("utf-8")


def parse_ids(text):
    return [int(t) for t in text.split()]


def tokenize(tandem_bin, model_path, prompt):
    ids = parse_ids(run_tandem(tandem_bin, ["tokenize", "-m", model_path, "--special"], prompt))
    assert ids, "tandem tokenize returned no ids"
    return ids


def relative_l2(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(PROMPTS))
def test_last_position_logits(name, tandem_bin, model_path, ref_model, tmp_path, report):
    ids = tokenize(tandem_bin, model_path, PROMPTS[name])
    out_file = str(tmp_path / "logits.f32")
    ids_text = " ".join(str(i) for i in ids)
    printed = run_tandem(tandem_bin, ["logits", "-m", model_path, "--ids", ids_text, "-o", out_file])
    assert parse_ids(printed) == ids, "tandem logits echoed other ids than it was given"

    got = np.fromfile(out_file, dtype=np.float32)
    assert got.shape == (ref_model.n_vocab,), "expected %d float32 logits, got %d" % (
        ref_model.n_vocab,
        got.size,
    )
    assert np.all(np.isfinite(got)), "tandem's logits hold NaN or Inf"
    want = reference.logits(ref_model, ids)

    err = relative_l2(got, want)
    got_top, want_top = int(np.argmax(got)), int(np.argmax(want))
    max_abs = float(np.max(np.abs(got - want)))
    report(
        "logits %-8s %3d tokens: rel L2 %.3e  max |diff| %.3e  argmax tandem %d reference %d"
        % (name, len(ids), err, max_abs, got_top, want_top)
    )
    assert err < MAX_REL_L2, "relative L2 error %.3e is not below %.0e" % (err, MAX_REL_L2)
    assert got_top == want_top, "argmax differs: tandem %d, reference %d" % (got_top, want_top)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_continuation(name, tandem_bin, model_path, ref_model, report):
    prompt = PROMPTS[name]
    # `generate -p` tokenizes the prompt as `tokenize --special` does, with a
    # BOS in front only when the model asks for one.
    prompt_ids = tokenize(tandem_bin, model_path, prompt)
    if ref_model.add_bos and ref_model.bos_id >= 0:
        prompt_ids = [ref_model.bos_id] + prompt_ids

    got = parse_ids(
        run_tandem(
            tandem_bin,
            ["generate", "-m", model_path, "-p", prompt, "--temp", "0", "-n", str(N_GREEDY), "--ignore-eos", "--output-ids"],
        )
    )
    want, gaps, runners_up = reference.greedy(ref_model, prompt_ids, N_GREEDY)
    assert len(got) == N_GREEDY, "tandem generated %d ids, expected %d: %s" % (len(got), N_GREEDY, got)

    check_greedy("greedy", name, got, want, gaps, runners_up, report)


def check_greedy(label, name, got, want, gaps, runners_up, report):
    """Fails unless got == want, or they part at a near tie of the reference
    (top two within NEAR_TIE, got taking the runner-up) with every token
    before it the same."""
    n = len(want)
    first_diff = next((i for i in range(n) if got[i] != want[i]), None)
    closest = int(np.argmin(gaps))
    if first_diff is None:
        report(
            "%s %-8s %d tokens identical (closest reference step: %d, top-two gap %.2e)"
            % (label, name, n, closest, gaps[closest])
        )
        return
    detail = "step %d: got %d, reference %d (runner-up %d), reference top-two gap %.3e" % (
        first_diff,
        got[first_diff],
        want[first_diff],
        runners_up[first_diff],
        gaps[first_diff],
    )
    if gaps[first_diff] < NEAR_TIE and got[first_diff] == runners_up[first_diff]:
        report("%s %-8s NEAR TIE at %s; the %d tokens before it are identical" % (label, name, detail, first_diff))
        return
    report("%s %-8s DIVERGES at %s" % (label, name, detail))
    pytest.fail(
        "greedy continuation diverges away from a near tie at %s\n  got:       %s\n  reference: %s"
        % (detail, got, want)
    )


# ---- the reference itself against llama.cpp (llama-cpp-python) ----
#
# Run where a Python with llama-cpp-python is at LLAMACPP_PYTHON (default
# <repo>/.venv-bench/bin/python, see requirements-bench.txt); skipped
# otherwise. llama.cpp runs on an F32 copy of the model (the very weights the
# reference uses, so it computes in float32 too): that must agree closely.
# llama.cpp on the quantized file, which rounds activations to 8 bits before
# each matmul, is measured and printed only.

MAX_REL_L2_F32 = 5e-3
BENCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_llamacpp.py")


@pytest.fixture(scope="session")
def llamacpp_python():
    path = os.environ.get("LLAMACPP_PYTHON") or os.path.join(REPO, ".venv-bench", "bin", "python")
    if not os.access(path, os.X_OK):
        pytest.skip("no llama-cpp-python at %s (set LLAMACPP_PYTHON; see requirements-bench.txt)" % path)
    return path


@pytest.fixture(scope="session")
def f32_model(model_path, llamacpp_python, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("f32") / "model-f32.gguf")
    reference.write_f32_copy(model_path, path)
    yield path
    os.unlink(path)


def run_llamacpp(python, model, prompt, out_file, n_greedy):
    """llama.cpp's token ids, greedy ids and last-position logits of prompt."""
    proc = subprocess.run(
        [python, BENCH_SCRIPT, "-m", model, "--logits-of", prompt, "-o", out_file, "--greedy", str(n_greedy),
         "--flash-attn", "off"],  # its flash attention computes Q.K in f16
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=TIMEOUT_S,
    )
    if proc.returncode != 0:
        pytest.fail("bench_llamacpp.py --logits-of failed:\n" + proc.stderr.decode("utf-8", "replace")[-3000:])
    result = json.loads(proc.stdout)
    return result["ids"], result["greedy"], np.fromfile(out_file, dtype=np.float32)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_reference_against_llamacpp(name, llamacpp_python, model_path, f32_model, ref_model, tmp_path, report):
    out_file = str(tmp_path / "logits.f32")
    ids, got_greedy, got = run_llamacpp(llamacpp_python, f32_model, PROMPTS[name], out_file, N_GREEDY)
    want = reference.logits(ref_model, ids)
    want_greedy, gaps, runners_up = reference.greedy(ref_model, ids, N_GREEDY)

    q_ids, _, q_got = run_llamacpp(llamacpp_python, model_path, PROMPTS[name], out_file, 0)
    assert q_ids == ids
    report(
        "llama.cpp %-8s %3d tokens: F32 copy rel L2 %.3e; quantized file rel L2 %.3e (argmax %s)"
        % (name, len(ids), relative_l2(got, want), relative_l2(q_got, want),
           "same" if np.argmax(q_got) == np.argmax(want) else "differs")
    )
    err = relative_l2(got, want)
    assert err < MAX_REL_L2_F32, "reference vs llama.cpp (F32 copy): rel L2 %.3e" % err
    assert int(np.argmax(got)) == int(np.argmax(want))
    check_greedy("llama.cpp", name, got_greedy, want_greedy, gaps, runners_up, report)
