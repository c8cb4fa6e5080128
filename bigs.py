"""BiGS, the bidirectional gated state-space encoder of "Pretraining Without Attention"
(Wang, Yan, Gu, Rush, 2022), as pure JAX functions over plain dicts of arrays.

Read top to bottom next to the paper; sections 1 to 4 are the method and only the method:
  1. the S4D state-space model: its parameters, its convolution kernel K, the convolution, the recurrence;
  2. the gated bidirectional block (V, F, B, U_F, U_B, U, O);
  3. embeddings, the encoder (a stack of blocks), the pooler, the heads and `forward`;
  4. initialisation (the official one) and the fill-mask demo.
After the paper:
  5. the fast forms: the same sums as in 1 and 2, computed faster (matmuls for the convolution, GPU
     kernels, hand-written gradients). Each names the reference form it equals and the test that shows
     it; `Config(fast=False)` runs the model on the reference forms alone;
  6. checkpoints: the official Flax format and parameter names, save_pretrained, from_pretrained.

Shapes: L sequence length, batch the sequences of a batch, H hidden_size, I intermediate_size, N num_ssm
(complex modes), vocab vocab_size. V, F, B, U and O are the paper's activations of the block, nothing else.
The computation equals the official Flax implementation (tests: test_bigs.py).
"""

import dataclasses
import functools
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------------
# Configuration. Field names and defaults are those of the official BiGSConfig, so an official
# config.json (which omits fields left at their default) reads back to the same model.


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 30522
    hidden_size: int = 768  # H
    intermediate_size: int = 3072  # I
    num_hidden_layers: int = 24
    num_ssm: int = 64  # N, complex modes of each SSM
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    hidden_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: hidden_dropout_prob
    pad_token_id: int = 0
    pooler_type: str = "non_padding_mean"  # or "mean" (over every position, pads included)
    scaling: str = "hippo"  # SSM initialisation: "hippo", "lin" or "inv"
    num_labels: int = 2
    tie_word_embeddings: bool = True
    # Not in the official config: zero the SSM inputs at pad positions, so that pads cannot reach real
    # tokens (the official encoder ignores attention_mask). False reproduces the official outputs.
    mask_padding: bool = True
    # How to run it, not what it is (not saved in config.json; keyword arguments of from_pretrained):
    dtype: str = "float32"  # compute dtype of the matmuls: "float32" or "bfloat16"
    remat: bool = False  # recompute each layer in the backward pass: activation memory of one layer, not all
    fast: bool = True  # the fast forms of section 5; False: the reference forms alone, as sections 1 and 2 write them


RUN_SETTINGS = ("dtype", "remat", "fast")


PRESETS = {
    # The reference checkpoints' shape, for tests.
    "tiny": Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_ssm=8,
                   max_position_embeddings=64),
    # Default of train.py: trains on a 2-core CPU in minutes at 4096 tokens.
    "small": Config(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_ssm=16, max_position_embeddings=4096),
    # The shipped checkpoint's (checkpoints/mini): train.py --recipe gpu pretrains it in a minute on one GPU.
    "mini": Config(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_ssm=16,
                   max_position_embeddings=512),
    "base": Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, max_position_embeddings=4096),
    # The paper's model (BiGS-large: 23 layers, H=1024, I=3072, N=64, BERT's uncased vocabulary).
    "large": Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=23, max_position_embeddings=4096),
}

# ----------------------------------------------------------------------------------------------------
# 1. The S4D state-space model (one per direction per layer; one kernel shared by all H channels).
#    Continuous, with S4D's input matrix fixed to 1:  x'(t) = A x(t) + u(t),  y(t) = Re(C x(t)) + D u(t),
#    A = diag(A_1..A_N) complex.
#    Zero-order hold with step dt:  Abar = exp(dt A),  Bbar = (exp(dt A) - 1) / A.


def ssm_parameters(p):
    """A (N,) complex, its zero-order hold Bbar (N,), C (N,) complex and the step dt (1,) of one SSM's
    stored parameters. (Abar^l = exp(l dt A) is formed where it is used.)"""
    A = jnp.minimum(p["A_re"], -1e-4) + 1j * p["A_im"]  # real part kept negative: a stable SSM
    C = p["C"][:, 0] + 1j * p["C"][:, 1]
    dt = jnp.exp(p["log_step"])
    return A, (jnp.exp(dt * A) - 1) / A, C, dt


def ssm_kernel(p, L):
    """The SSM's convolution kernel K (L,): K[l] = Re sum_n C_n Bbar_n Abar_n^l, with Abar^l = exp(l dt A)."""
    A, Bbar, C, dt = ssm_parameters(p)
    l = jnp.arange(L)[:, None]  # (L, 1)
    return jnp.sum(C * Bbar * jnp.exp((l * dt) * A), axis=-1).real  # (L,)


def causal_conv(u, K):
    """y[t] = sum_{s<=t} K[t-s] u[s] along the time axis of u (L, batch, H), by FFTs of length 2L (no
    wrap-around)."""
    L = u.shape[0]
    y = jnp.fft.irfft(jnp.fft.rfft(u, n=2 * L, axis=0) * jnp.fft.rfft(K, n=2 * L)[:, None, None], n=2 * L, axis=0)
    return y[:L]


def ssm(p, u):
    """The SSM as a convolution: y = K * u + D u.  u, y: (L, batch, H), time first (as every SSM function here
    and the layers take them), float32 or wider (jnp.fft rejects bfloat16)."""
    u = u.astype(jnp.promote_types(u.dtype, jnp.float32))
    return causal_conv(u, ssm_kernel(p, u.shape[0])) + p["D"] * u


def ssm_recurrent(p, u):
    """The same SSM step by step: x_k = Abar x_{k-1} + Bbar u_k, y_k = Re(C x_k) + D u_k.  u, y: (L, batch, H).
    A recurrence costs L sequential steps; the convolution computes all L outputs at once."""
    A, Bbar, C, dt = ssm_parameters(p)
    Abar = jnp.exp(dt * A)  # (N,)

    def step(x, u_k):  # x: (batch, H, N) complex state, u_k: (batch, H)
        x = Abar * x + Bbar * u_k[..., None]
        return x, (x @ C).real + p["D"] * u_k

    x0 = jnp.zeros(u.shape[1:] + Abar.shape, jnp.complex64)
    return jax.lax.scan(step, x0, u)[1]


# ----------------------------------------------------------------------------------------------------
# 2. The gated bidirectional block. Every dense layer has a bias; the layers use the tanh GELU.
#    The block calls three operations through the dispatch points below (`residual_and_norm`, `gelu`,
#    `ssm_conv`), each named for what it computes: the reference form written here, or its fast form of
#    section 5 (the same function).


def dense(p, x, dtype):
    """x (..., n) @ kernel (n, m) + bias, in dtype."""
    x, kernel = x.astype(dtype), p["kernel"].astype(dtype)
    return (jnp.dot(x.reshape(-1, x.shape[-1]), kernel) + p["bias"].astype(dtype)).reshape(x.shape[:-1] + (-1,))


def moments(x, eps):
    """The mean of each row of x (..., H) and 1 / sqrt(its variance + eps), both (..., 1)."""
    mean = x.mean(-1, keepdims=True)
    return mean, jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)


def layer_norm(p, x, eps):
    x = x.astype(jnp.float32)
    mean, rstd = moments(x, eps)
    return (x - mean) * rstd * p["scale"] + p["bias"]


def residual_and_norm(p, x, config):
    """The two paths of a pre-norm block: the residual stream x as it is, and X = LayerNorm(x) in the compute
    dtype.  x: (L, batch, H) float32. (Returned together so that a fast form may sum both paths' gradients.)"""
    if config.fast and use_kernels():
        return pre_norm(p, x, config.layer_norm_eps, jnp.dtype(config.dtype))
    return x, layer_norm(p, x, config.layer_norm_eps).astype(config.dtype)


def gelu(x, config):
    """The layers' GELU, in its tanh form: 0.5 x (1 + tanh(c (x + a x^3))), c = sqrt(2/pi), a = 0.044715."""
    return gelu_fast(x) if config.fast else jax.nn.gelu(x, approximate=True)


def ssm_conv(p, u, config, reverse=False):
    """SSM(u) along the time axis of u (L, batch, H), in u's dtype; reverse=True reads the sequence from its
    end: Flip(SSM(Flip(u)))."""
    if config.fast:
        return ssm_chunked(p, u, reverse, Q=chunk_size(config))
    flip = lambda a: jnp.flip(a, axis=0)
    return (flip(ssm(p, flip(u))) if reverse else ssm(p, u)).astype(u.dtype)


def bigs_layer(p, x, mask, config):
    """One BiGS layer, pre-norm: x + O(LayerNorm(x)).  x: (L, batch, H), time first; mask: (L, batch, 1) of
    0/1, or None. The paper's B = gelu(W_b Flip(X)) and U_B = Flip(W_ub SSM_b(B)): since W_b and W_ub act on
    each token alone they commute with Flip, so B is computed in reading order (one matmul with V and F) and
    SSM_b reads it from the end (reverse=True)."""
    cdt = jnp.dtype(config.dtype)  # the matmuls' compute dtype
    I, H = config.intermediate_size, config.hidden_size
    x, X = residual_and_norm(p["norm"], x, config)  # X = LayerNorm(x); x, the residual stream
    W = {k: jnp.concatenate([p[w][k] for w in ("W_v", "W_f", "W_b")], -1) for k in ("kernel", "bias")}
    V, F, B = jnp.split(gelu(dense(W, X, cdt), config), [I, I + H], axis=-1)  # V (L, batch, I); F, B (L, batch, H)
    if mask is not None:  # pads feed nothing into either SSM
        F, B = F * mask.astype(cdt), B * mask.astype(cdt)
    U_F = dense(p["W_uf"], ssm_conv(p["ssm_f"], F, config), cdt)  # (L, batch, H)  the forward SSM
    U_B = dense(p["W_ub"], ssm_conv(p["ssm_b"], B, config, reverse=True), cdt)  # (L, batch, H)  the backward SSM
    U = gelu(dense(p["W_l"], U_F * U_B, cdt), config)  # (L, batch, I)  multiplicative gating
    O = dense(p["W_o"], U * V, cdt)  # (L, batch, H)
    return x + O.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# 3. Embeddings, encoder, pooler, heads.


def dropout(x, rate, rng):
    """Inverted dropout; rng None means evaluation (identity)."""
    if rng is None or rate == 0:
        return x
    keep = jax.random.bernoulli(rng, 1 - rate, x.shape)
    return jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)


def embed(p, config, input_ids, token_type_ids, rng):
    """Word + learned absolute position + token type, LayerNorm, dropout.  Time first: (L, batch) -> (L, batch, H)."""
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[0])[:, None], input_ids.shape)  # (L, batch)
    x = p["word"][input_ids] + p["token_type"][token_type_ids] + p["position"][positions]
    return dropout(layer_norm(p["norm"], x, config.layer_norm_eps), config.hidden_dropout_prob, rng)


def encode(params, config, input_ids, attention_mask=None, token_type_ids=None, rng=None):
    """Embeddings, then the stack of BiGS layers (parameters stacked on a leading layer axis).
    input_ids, attention_mask, token_type_ids: (batch, L) -> hidden states (L, batch, H), time first as the
    layers compute them."""
    L = input_ids.shape[-1]
    if not 1 <= L <= config.max_position_embeddings:
        raise ValueError(f"sequence length {L} is outside 1..max_position_embeddings={config.max_position_embeddings}")
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    x = embed(params["embeddings"], config, input_ids.T, token_type_ids.T, rng)  # (L, batch, H)
    mask = None
    if config.mask_padding and attention_mask is not None:
        mask = attention_mask.T[..., None].astype(jnp.float32)  # (L, batch, 1)
    layer = jax.checkpoint(bigs_layer, static_argnums=3) if config.remat else bigs_layer
    for p in unstack(params["layers"], config.num_hidden_layers):
        x = layer(p, x, mask, config)
    return x


def unstack(tree, n):
    """The n trees of a tree whose leaves are stacked on a leading axis of length n."""
    parts = jax.tree.map(lambda a: [piece[0] for piece in jnp.split(a, n)], tree)
    return [jax.tree.map(lambda piece: piece[i], parts, is_leaf=lambda x: isinstance(x, list)) for i in range(n)]


def pool_mean(config, h, attention_mask):
    """The mean of the hidden states h (L, batch, H) over the real tokens ('non_padding_mean') or all ('mean'):
    (batch, H), the pooler's input."""
    if config.pooler_type == "mean" or attention_mask is None:
        return h.mean(axis=0)
    m = attention_mask.T[..., None].astype(h.dtype)
    return (h * m).sum(axis=0) / m.sum(axis=0)


def pool(p, config, h, attention_mask):
    """tanh(dense(pool_mean(h))): (batch, H)."""
    return jnp.tanh(dense(p, pool_mean(config, h, attention_mask), jnp.float32))


def mlm_head(params, config, h, masked_positions=None):
    """Masked-LM logits (batch, L, vocab), or (batch, M, vocab) at masked_positions (batch, M) only, from h
    (L, batch, H): dense, exact GELU, LayerNorm, then the decoder (tied: the word embeddings transposed) and a
    bias."""
    p = params["mlm"]
    if masked_positions is None:
        h = h.swapaxes(0, 1)  # (batch, L, H)
    else:
        h = h[masked_positions, jnp.arange(h.shape[1])[:, None]]  # (batch, M, H)
    cdt = jnp.dtype(config.dtype)
    t = layer_norm(p["norm"], jax.nn.gelu(dense(p["dense"], h, cdt), approximate=False), config.layer_norm_eps)
    W = params["embeddings"]["word"].T if config.tie_word_embeddings else p["decoder"]  # (H, vocab)
    n, pad = W.shape[1], ((0, 0), (0, -W.shape[1] % 128))  # the vocabulary padded to whole tiles, then cut back
    logits = dense({"kernel": jnp.pad(W, pad), "bias": jnp.pad(p["bias"], pad[1])}, t, cdt)
    return logits[..., :n].astype(jnp.float32)


HEADS = ("mlm", "classification", "token_classification", "question_answering", "multiple_choice")


def forward(params, config, input_ids, attention_mask=None, token_type_ids=None, *, head, train=False, rng=None,
            masked_positions=None):
    """The model with one head. Returns
      mlm: logits (batch, L, vocab), or (batch, M, vocab) at masked_positions (batch, M);
      classification: (batch, num_labels) (num_labels = 1: a regression score);
      token_classification: (batch, L, num_labels);
      question_answering: (start_logits, end_logits), each (batch, L);
      multiple_choice: input (batch, choices, L), logits (batch, choices).
    train=True applies dropout where the official model has it, drawn from rng."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; one of {', '.join(HEADS)}")
    if train and rng is None:
        raise ValueError("train=True needs rng (a jax.random key) for dropout")
    rng_embed, rng_head = jax.random.split(rng) if train else (None, None)
    if head == "multiple_choice":  # every choice is a sequence of its own
        num_choices = input_ids.shape[1]
        flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])
        input_ids, attention_mask, token_type_ids = flat(input_ids), flat(attention_mask), flat(token_type_ids)
    h = encode(params, config, input_ids, attention_mask, token_type_ids, rng_embed)
    if head == "mlm":
        return mlm_head(params, config, h, masked_positions)
    if head == "token_classification":
        h = dropout(h, config.hidden_dropout_prob, rng_head)
        return dense(params["classifier"], h, jnp.float32).swapaxes(0, 1)  # (batch, L, num_labels)
    if head == "question_answering":
        logits = dense(params["qa_outputs"], h, jnp.float32).swapaxes(0, 1)  # (batch, L, 2)
        return logits[..., 0], logits[..., 1]
    pooled = pool(params["pooler"], config, h, attention_mask)  # (batch, H)
    if head == "multiple_choice":
        pooled = dropout(pooled, config.hidden_dropout_prob, rng_head)
        return dense(params["classifier"], pooled, jnp.float32).reshape(-1, num_choices)
    rate = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
    return dense(params["classifier"], dropout(pooled, rate, rng_head), jnp.float32)


# ----------------------------------------------------------------------------------------------------
# 4. Initialisation (the official one), and the fill-mask demo.


def hippo_imag(N):
    """Imaginary parts of the eigenvalues of the normal part of HiPPO-LegS (N,), ascending; real parts are -1/2."""
    q = np.sqrt(1 + 2 * np.arange(N))
    hippo = np.tril(q[:, None] * q[None, :]) - np.diag(np.arange(N))  # HiPPO-LegS, A = -hippo
    p = np.sqrt(np.arange(N) + 0.5)
    S = -hippo + p[:, None] * p[None, :]  # = -1/2 I + a skew-symmetric matrix
    return np.linalg.eigvalsh(-1j * S)


def ssm_init(key, N, scaling):
    n = np.arange(N)
    A_im = {"hippo": lambda: hippo_imag(N), "lin": lambda: np.pi * n,
            "inv": lambda: (N / np.pi) * (N / (2 * n + 1) - 1)}[scaling]()
    kc, kd = jax.random.split(key)
    return {
        "A_re": jnp.full((N,), -0.5, jnp.float32),
        "A_im": jnp.asarray(A_im, jnp.float32),
        "C": jax.random.normal(kc, (N, 2)) * np.sqrt(0.5),
        "D": jnp.ones((1,)),
        "log_step": jax.random.uniform(kd, (1,), minval=np.log(0.01), maxval=np.log(1.0)),
    }


def init_params(config, key, head="mlm"):
    """Parameters of the encoder and one head, drawn as the official code draws them. Layers are stacked:
    each leaf of params['layers'] has a leading axis of length num_hidden_layers."""
    if config.scaling not in ("hippo", "lin", "inv"):
        raise ValueError(f"unknown scaling {config.scaling!r}; one of hippo, lin, inv")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; one of {', '.join(HEADS)}")
    H, I, N, s = config.hidden_size, config.intermediate_size, config.num_ssm, config.initializer_range
    keys = iter(jax.random.split(key, 16))
    normal = lambda k, shape: s * jax.random.normal(k, shape)
    lecun = lambda k, shape: jax.nn.initializers.lecun_normal()(k, shape)  # Flax's default for the heads
    linear = lambda k, n_in, n_out, init=normal: {"kernel": init(k, (n_in, n_out)), "bias": jnp.zeros((n_out,))}
    norm = lambda: {"scale": jnp.ones((H,)), "bias": jnp.zeros((H,))}

    def layer(k):
        k = jax.random.split(k, 9)
        return {"norm": norm(), "W_v": linear(k[0], H, I), "W_f": linear(k[1], H, H), "W_b": linear(k[2], H, H),
                "W_uf": linear(k[3], H, H), "W_ub": linear(k[4], H, H), "W_l": linear(k[5], H, I),
                "W_o": linear(k[6], I, H),
                "ssm_f": ssm_init(k[7], N, config.scaling), "ssm_b": ssm_init(k[8], N, config.scaling)}

    layer_keys = jax.random.split(next(keys), config.num_hidden_layers)
    params = {
        "embeddings": {"word": normal(next(keys), (config.vocab_size, H)),
                       "position": normal(next(keys), (config.max_position_embeddings, H)),
                       "token_type": normal(next(keys), (config.type_vocab_size, H)), "norm": norm()},
        "layers": jax.tree.map(lambda *leaves: jnp.stack(leaves), *[layer(k) for k in layer_keys]),
    }
    if head == "mlm":
        params["mlm"] = {"dense": linear(next(keys), H, H, lecun), "norm": norm(),
                         "bias": jnp.zeros((config.vocab_size,))}
        if not config.tie_word_embeddings:
            params["mlm"]["decoder"] = normal(next(keys), (H, config.vocab_size))
    if head in ("classification", "multiple_choice"):
        params["pooler"] = linear(next(keys), H, H)
    if head in ("classification", "token_classification"):
        params["classifier"] = linear(next(keys), H, config.num_labels, lecun)
    if head == "multiple_choice":
        params["classifier"] = linear(next(keys), H, 1, lecun)
    if head == "question_answering":
        params["qa_outputs"] = linear(next(keys), H, 2, lecun)  # start and end logits
    return params


# The official README's demo: the most likely tokens for each [MASK].


def fill_mask(params, config, tokenizer, text, top_k=5):
    """[[(token, probability), ...] for each [MASK] in text], most likely first. tokenizer: a
    `tokenizers.Tokenizer` with BERT's special tokens (its post-processor adds [CLS] and [SEP])."""
    ids = tokenizer.encode(text).ids
    mask_id = tokenizer.token_to_id("[MASK]")
    positions = [i for i, t in enumerate(ids) if t == mask_id]
    if not positions:
        raise ValueError(f"no [MASK] in {text!r}")
    logits = jax.jit(forward, static_argnames=("config", "head"))(params, config, jnp.asarray([ids]), head="mlm",
                                                                  masked_positions=jnp.asarray([positions]))
    probs = jax.nn.softmax(logits[0], axis=-1)  # (M, vocab)
    top = jnp.argsort(-probs, axis=-1)[:, :top_k]
    return [[(tokenizer.id_to_token(int(t)), float(probs[m, t])) for t in top[m]] for m in range(len(positions))]


# ----------------------------------------------------------------------------------------------------
# 5. The fast forms: the same sums as sections 1 and 2, computed faster. Each names the reference form it
#    equals and the test in test_bigs.py that compares them; the dispatch points of section 2 choose them.
#    5a. ssm_chunked: the SSM convolution as matmuls (reference: ssm, the FFT form);
#    5b. ssm_scan: the chunked form as one GPU kernel, and its backward pass (reference: ssm);
#    5c. pre_norm: LayerNorm with a hand-written backward pass, a GPU kernel (reference: layer_norm, autodiff);
#    5d. gelu_fast: the tanh GELU in its sigmoid form, with a hand-written backward pass (reference: jax.nn.gelu).
#    The kernels are written in Pallas and compiled by Triton on a GPU; on a CPU the tests interpret them.
#    On a mesh each device runs them on its own sequences (per_device, in 5b).
#
#    Sections 1-3 are also laid out for speed where that leaves the sums unchanged (the measurements are in
#    docs/performance.md):
#    - activations are time first, (L, batch, H), so that each convolution matmul contracts the leading axis;
#      encode transposes the ids, not the activations: a transpose of the activations at either end makes
#      XLA store the whole residual stream batch-first, a transpose in every layer;
#    - embed looks the position embeddings up per token: one (L, H) slice added to every sequence has a
#      gradient summed over the batch, for which XLA stores the residual stream with the batch minor on GPUs;
#    - dense is one matmul of (tokens, n): with the leading axes kept, the kernel's gradient contracts two axes
#      at once, which XLA's CPU backend does at about half the rate of a matmul;
#    - bigs_layer computes V, F and B as one matmul and runs SSM_b in reverse instead of flipping: four passes
#      over the activations fewer;
#    - encode loops over the layers in Python, not lax.scan, so that XLA fuses and schedules across layers,
#      and unstack splits the stacked parameters (the gradient of a split is one concatenation, that of n
#      indexings a sum of n zero-padded copies);
#    - mlm_head pads the vocabulary to whole tiles of 128 columns: with 30,522 a GPU ran the decoder's input
#      gradient at a third of the speed of the other matmuls;
#    - fill_mask runs forward as one compiled program: op by op it takes many times longer on a CPU.


# 5a. ---------------------------------------------------------------------------------------------------


def chunk_size(config):
    """ssm_conv's chunk Q, each measured fastest: 512 tokens, and on a CPU 8 N (128 for the default model)."""
    return 8 * config.num_ssm if jax.default_backend() == "cpu" else 512


def toeplitz(k):
    """T (Q, Q) with T[i, j] = k[i - j] below the diagonal and 0 above: row i of T is the reversed k,
    zero-padded to 2Q, rotated by i, so T is a slice of that vector tiled Q times. (Indexing k by i - j
    would also do, but its gradient is a scatter-add of Q^2 values into Q, slow on GPUs.)"""
    Q = k.shape[0]
    rows = jnp.tile(jnp.concatenate([k[::-1], jnp.zeros_like(k)]), Q)[: Q * (2 * Q - 1)].reshape(Q, 2 * Q - 1)
    return rows[:, Q - 1:]


def chunk_matrices(p, Q, reverse=False):
    """The SSM's matrices for chunks of Q tokens (see ssm_chunked; i, j count from the chunk's start,
    or from its end when reverse):  T (Q, Q) the Toeplitz matrix of K[0..Q) with K[0] + D on its
    diagonal (transposed when reverse);  S = Abar^(Q-j), from position j to the chunk's edge;
    E = C Bbar Abar^i, from the state at the edge to position i. Both complex, kept as real parts for
    real matmuls: S (2, N, Q) = (Re, Im) and E (2, Q, N) = (Re, -Im), so Re(E h) = E[0] Re h + E[1] Im h."""
    A, Bbar, C, dt = ssm_parameters(p)
    T = toeplitz(ssm_kernel(p, Q)) + p["D"] * jnp.eye(Q)
    i = jnp.arange(Q)
    to_edge, from_edge = (i, Q - i) if reverse else (Q - i, i)  # powers of Abar between position and state
    S = jnp.exp((to_edge[None, :] * dt) * A[:, None])  # (N, Q)
    E = C * Bbar * jnp.exp((from_edge[:, None] * dt) * A)  # (Q, N)
    return (T.T if reverse else T), jnp.stack([S.real, S.imag]), jnp.stack([E.real, -E.imag])


def ssm_chunked(p, u, reverse=False, Q=512):
    """The same y = K * u + D u as `ssm` (test: test_chunked_matmul_form_equals_fft_form), as matmuls, which
    GPUs and TPUs run far faster than FFTs. Split t = cQ + i:
      within chunk c:  sum_{j<=i} K[i-j] u[c,j] + D u[c,i], a (Q, Q) lower-triangular Toeplitz matmul
                       with K[0] + D on its diagonal;
      from before it:  Re sum_n C_n Bbar_n Abar_n^i h[c,n], with the N-mode state
                       h[c] = sum_{s < cQ} Abar^(cQ-s) u[s] = sum_{c'<c} Abar^(Q(c-1-c')) g[c'],
                       g[c'] = sum_j Abar^(Q-j) u[c',j].
    reverse=True runs the SSM from the end of the sequence (= flip(ssm(flip(u))), without the flips):
    the Toeplitz matrix is transposed, the state comes from later chunks, and i and j count from the
    chunk's other end. u: (L, batch, H); every power of Abar here is <= 1 in modulus, so nothing grows.
    Time comes first so that each matmul contracts u's leading axis: all sequences and channels are the
    columns of one GEMM, (Q, Q) x (Q, batch*H), with no transposes and no per-sequence copies of T.
    The matmuls run in u's dtype (bfloat16 in mixed precision; their gradients then do too).
    On GPUs in bfloat16, sequences longer than 2Q go to `ssm_scan`, the same sum as one kernel."""
    L, batch, H = u.shape
    if L > 2 * Q and use_scan_kernel(u):
        return ssm_scan(p, u, reverse)
    Q = L if L <= 2 * Q else Q  # up to 2Q tokens one Toeplitz matmul costs less than carrying the state
    nC = -(-L // Q)
    x = jnp.pad(u, ((0, nC * Q - L), (0, 0), (0, 0))).reshape(nC, Q, batch * H)  # chunk c: x[c] (Q, batch*H)

    def matmul(M, x):  # M (m, k) times each chunk's x (k, batch*H) -> (nC, m, batch*H); M is copied once per
        M = jnp.broadcast_to(M.astype(u.dtype), x.shape[:1] + M.shape)  # chunk, so that XLA runs a batched
        return jnp.einsum("cmk,ckn->cmn", M, x)  # matmul rather than transposing x to put the chunks in columns

    T, S, E = chunk_matrices(p, Q, reverse)
    y = matmul(T, x)  # (nC, Q, batch*H)
    if nC > 1:  # the matmuls over the N modes run on stacked real and imaginary parts (2N rows)
        A, _, _, dt = ssm_parameters(p)
        N = A.shape[0]
        g = matmul(S.reshape(2 * N, Q), x)  # (nC, 2N, batch*H)
        c = jnp.arange(nC)
        d = (c[None, :] - 1 - c[:, None]) if reverse else (c[:, None] - 1 - c[None, :])  # whole chunks between
        M = jnp.where((d >= 0)[..., None], jnp.exp((jnp.maximum(d, 0)[..., None] * Q * dt) * A), 0)  # (nC, nC, N)
        # h[c] = sum_c' M[c, c'] g[c'] (complex, per mode) as one real matmul over all chunks at once: each
        # complex factor m becomes the block [[Re m, -Im m], [Im m, Re m]] acting on stacked (Re g, Im g).
        diag = lambda m: m[..., None] * jnp.eye(N)  # (nC, nC, N, N)
        R = jnp.block([[diag(M.real), diag(-M.imag)], [diag(M.imag), diag(M.real)]])  # (nC, nC, 2N, 2N)
        R = R.transpose(0, 2, 1, 3).reshape(nC * 2 * N, nC * 2 * N)
        h = jnp.dot(R.astype(u.dtype), g.reshape(nC * 2 * N, -1)).reshape(nC, 2 * N, -1)  # (Re h, Im h)
        E = E.transpose(1, 0, 2).reshape(Q, 2 * N)  # (Q, 2N)
        y = y.astype(jnp.float32) + matmul(E, h).astype(jnp.float32)  # + Re(E h)
    return y.reshape(nC * Q, batch, H)[:L].astype(u.dtype)


# 5b. ---------------------------------------------------------------------------------------------------
# The chunked form as one GPU kernel. XLA runs ssm_chunked's state as separate matmuls, slices and sums,
# each a pass over the activations; here each program takes SCAN_CHANNELS channels of one sequence
# through its chunks in order and keeps the state in registers:
#   y[c] = T x[c] + Re(E h[c]),   h[c+1] = Abar^Q h[c] + S x[c]   (h[0] = 0; complex h as Re, Im).
# Its transpose (the backward pass) is the same loop run the other way with T^T, E^T and S^T swapped and
# conj(Abar^Q). The matrices are read once per program, not re-read from memory for every chunk, and
# each chunk's x is loaded while the one before is computed. Up to 2 x 512 tokens the Toeplitz matmul
# of ssm_chunked is faster, so the kernel takes longer sequences only.
SCAN_CHANNELS = 64


def use_kernels():
    """Whether this file's kernels run: on a GPU, compiled by Triton. Elsewhere the same sums run as XLA
    operations (the tests run the kernels interpreted on the CPU by making this return True)."""
    return jax.default_backend() == "gpu"


def per_device(f, args, in_axes, out_axes):
    """f(*args), each device of the mesh in context (jax.set_mesh; train.py sets it) running f on its part of
    the batch. in_axes: each argument's batch axis, or None for one that every device takes whole (the
    SSM's matrices); out_axes: each output's batch axis. A kernel is one device's program: given arrays split
    over devices, XLA would first gather them whole onto every device. The gradients of the whole
    arguments are summed over the devices by shard_map's transpose. Without a mesh, or with a batch that
    the 'data' axis does not divide, f runs on the whole arrays."""
    from jax.sharding import PartitionSpec as P
    mesh = jax.sharding.get_abstract_mesh()
    batch = next(a.shape[axis] for a, axis in zip(args, in_axes) if axis is not None)
    if mesh.empty or mesh.size == 1 or "data" not in mesh.axis_names or batch % mesh.shape["data"]:
        return f(*args)
    spec = lambda axis: P() if axis is None else P(*[None] * axis, "data")
    return jax.shard_map(f, mesh=mesh, in_specs=tuple(map(spec, in_axes)), out_specs=tuple(map(spec, out_axes)),
                         check_vma=False)(*args)


def compiled_on_gpu(num_warps):
    """pallas_call's arguments for this file's kernels: compiled by Triton on a GPU with num_warps warps,
    interpreted elsewhere (the tests on the CPU)."""
    if jax.default_backend() != "gpu":
        return {"interpret": True}
    from jax.experimental.pallas import triton as pltriton
    return {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=1)}


def use_scan_kernel(u):
    """Where the kernel is measured to win: on a GPU, in bfloat16, H a multiple of SCAN_CHANNELS."""
    return use_kernels() and u.dtype == jnp.bfloat16 and u.shape[-1] % SCAN_CHANNELS == 0


def scan_kernel(x_ref, T_ref, Sr_ref, Si_ref, Er_ref, Ei_ref, ar_ref, ai_ref, y_ref, xh_ref, *, reverse):
    """x_ref, y_ref: (nC, Q, bh) one sequence's channels; xh_ref: (nC, Q + 2N, bh) each chunk's x over the
    state before it (Re h; Im h), kept for the gradients; Er, Ei: the real and imaginary parts' maps,
    Re(E h) = Er hr + Ei hi."""
    nC, Q, N, f32 = x_ref.shape[0], x_ref.shape[1], Sr_ref.shape[0], jnp.float32
    T, Sr, Si, Er, Ei = (r[...] for r in (T_ref, Sr_ref, Si_ref, Er_ref, Ei_ref))  # read once, not per chunk
    ar, ai = ar_ref[...], ai_ref[...]  # (N, 1): Abar^Q
    chunk_at = lambda k: jnp.clip(nC - 1 - k if reverse else k, 0, nC - 1)  # the k-th chunk visited

    def chunk(k, carry):
        hr, hi, x = carry  # (N, bh) float32, and x[c] (Q, bh), loaded one step ahead
        c = chunk_at(k)
        x_next = x_ref[chunk_at(k + 1)]  # issued now, used next step: its load overlaps this chunk's matmuls
        xh_ref[c, :Q], xh_ref[c, Q:Q + N], xh_ref[c, Q + N:] = x, hr.astype(x.dtype), hi.astype(x.dtype)
        dot = lambda M, z: jnp.dot(M, z.astype(x.dtype), preferred_element_type=f32)
        y_ref[c] = (dot(T, x) + dot(Er, hr) + dot(Ei, hi)).astype(y_ref.dtype)
        return ar * hr - ai * hi + dot(Sr, x), ai * hr + ar * hi + dot(Si, x), x_next

    zero = jnp.zeros((N, x_ref.shape[2]), f32)
    jax.lax.fori_loop(0, nC, chunk, (zero, zero, x_ref[chunk_at(0)]))


def scan_call(x, T, S, E, a, reverse):
    """Runs scan_kernel over (sequence, block of channels). x (nC, Q, batch, H); T, S, E from chunk_matrices;
    a (2, N) = Abar^Q's (Re, Im). -> y like x, and x over the states, (nC, Q + 2N, batch, H)."""
    from jax.experimental import pallas as pl
    nC, Q, batch, H = x.shape
    N, bh, cdt = S.shape[1], SCAN_CHANNELS, x.dtype
    whole = lambda *shape: pl.BlockSpec(shape, lambda s, j: (0,) * len(shape))
    xs, xhs = (pl.BlockSpec((nC, m, None, bh), lambda s, j: (0, 0, s, j)) for m in (Q, Q + 2 * N))
    return pl.pallas_call(
        functools.partial(scan_kernel, reverse=reverse), grid=(batch, H // bh),
        in_specs=[xs, whole(Q, Q), whole(N, Q), whole(N, Q), whole(Q, N), whole(Q, N), whole(N, 1), whole(N, 1)],
        out_specs=[xs, xhs],
        out_shape=[jax.ShapeDtypeStruct(x.shape, cdt), jax.ShapeDtypeStruct((nC, Q + 2 * N, batch, H), cdt)],
        **compiled_on_gpu(num_warps=4),
    )(x, *(m.astype(cdt) for m in (T, S[0], S[1], E[0], E[1])), *(r[:, None].astype(jnp.float32) for r in a))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def chunk_scan(x, T, S, E, a, reverse):
    return scan_call(x, T, S, E, a, reverse)[0]


def chunk_scan_forward(x, T, S, E, a, reverse):
    y, xh = scan_call(x, T, S, E, a, reverse)
    return y, (T, S, E, a, xh)


def chunk_scan_backward(reverse, saved, dy):
    """dx[c] = T^T dy[c] + S^T lam[c+1],  lam[c] = conj(Abar^Q) lam[c+1] + E^T dy[c]: the kernel run the other
    way. With lam (the gradient of the state after each chunk) stacked under dy as the kernel writes them,
    every gradient of the matrices is a block of one Gram matrix,  G = sum_c [dy; lam][c] [x; h][c]^T:
    dT = sum dy x^T,  dE = sum dy h^T,  dS = sum lam x^T,  and da from the diagonals of sum lam h^T
    (da = sum conj(h) lam, per mode). One pass over the four arrays instead of one per product."""
    T, S, E, a, xh = saved  # xh, dyl: (nC, Q + 2N, batch, H), the states as real parts over imaginary
    Q, N = T.shape[0], S.shape[1]
    swap = lambda M: M.transpose(0, 2, 1)
    dx, dyl = scan_call(dy, T.T, swap(E), swap(S), a * jnp.array([1, -1])[:, None], not reverse)
    # one matmul per chunk over all sequences and channels (batch*H), then summed over the chunks
    G = jnp.einsum("cibh,cjbh->cij", dyl, xh, preferred_element_type=jnp.float32).sum(0)  # (Q + 2N, Q + 2N)
    dS = G[Q:, :Q].reshape(2, N, Q)
    dE = G[:Q, Q:].reshape(Q, 2, N).transpose(1, 0, 2)
    d = jnp.diagonal(G[Q:, Q:].reshape(2, N, 2, N), axis1=1, axis2=3)  # (2, 2, N): d[p, q] = sum lam_p h_q
    da = jnp.stack([d[0, 0] + d[1, 1], d[1, 0] - d[0, 1]])  # (Re, Im) = (lr hr + li hi, li hr - lr hi)
    return dx, G[:Q, :Q].astype(T.dtype), dS.astype(S.dtype), dE.astype(E.dtype), da.astype(a.dtype)


chunk_scan.defvjp(chunk_scan_forward, chunk_scan_backward)


def ssm_scan(p, u, reverse=False, Q=128):
    """ssm_chunked's sum by the kernel above, equal to `ssm` in values and gradients (test:
    test_scan_kernel_interpreted_equals_fft_form).  u, y: (L, batch, H), H a multiple of SCAN_CHANNELS."""
    L, batch, H = u.shape
    nC = -(-L // Q)
    x = jnp.pad(u, ((0, nC * Q - L), (0, 0), (0, 0))).reshape(nC, Q, batch, H)
    A, _, _, dt = ssm_parameters(p)
    T, S, E = chunk_matrices(p, Q, reverse)
    a = jnp.exp((Q * dt) * A)  # (N,): a whole chunk
    scan = lambda x, T, S, E, a: (chunk_scan(x, T, S, E, a, reverse),)
    (y,) = per_device(scan, (x, T, S, E, jnp.stack([a.real, a.imag])), (2, None, None, None, None), (2,))
    return y.reshape(nC * Q, batch, H)[:L]


# 5c. ---------------------------------------------------------------------------------------------------
# The block's LayerNorm with its backward pass written out, as a GPU kernel: autodiff's backward pass, as
# XLA compiles it for a GPU, makes several passes over the activations; written out it is one pass per row.
# Since the residual path x + O(...) meets LayerNorm's input, the same pass adds the residual's gradient dres:
#   xhat = (x - mean) rstd,   dx = dres + rstd (g s - mean(g s) - xhat mean(g s xhat)),
#   dscale = sum over tokens of g xhat,   dbias = sum of g    (g: the output's gradient, s: the scale,
#   means over the H features).
# A program takes NORM_STEPS steps of NORM_ROWS rows (held in registers by 4 warps) and sums over its rows.
# Triton loads and stores blocks whose size is a power of 2, so each row is read in pieces of the largest
# power of 2 that divides H (BiGS-large: one piece of 1024; BiGS-base: three of 256).
NORM_ROWS, NORM_STEPS = 4, 32


def norm_kernel(x_ref, g_ref, dres_ref, scale_ref, dx_ref, dscale_ref, dbias_ref, *, eps):
    """The pass above over pieces of rows.  x, g, dres, dx: (128, H) rows; scale: (1, H); dscale, dbias:
    (1, H), this program's sums."""
    from jax.experimental import pallas as pl
    H = x_ref.shape[1]
    pieces = [pl.ds(j, H & -H) for j in range(0, H, H & -H)]
    total = lambda parts: sum(a.sum(-1, keepdims=True) for a in parts)  # over the whole row: (NORM_ROWS, 1)

    def step(i, sums):
        rows = pl.ds(i * NORM_ROWS, NORM_ROWS)
        x = [x_ref[rows, c] for c in pieces]
        g = [g_ref[rows, c].astype(jnp.float32) for c in pieces]
        mean = total(x) / H
        rstd = jax.lax.rsqrt(total([jnp.square(a - mean) for a in x]) / H + eps)
        xhat = [(a - mean) * rstd for a in x]
        gs = [a * scale_ref[:, c] for a, c in zip(g, pieces)]
        m1, m2 = total(gs) / H, total([a * b for a, b in zip(gs, xhat)]) / H
        for c, a, b in zip(pieces, gs, xhat):
            dx_ref[rows, c] = dres_ref[rows, c] + rstd * (a - m1 - b * m2)
        return ([s + (a * b).sum(0, keepdims=True) for s, a, b in zip(sums[0], g, xhat)],
                [s + a.sum(0, keepdims=True) for s, a in zip(sums[1], g)])

    zero = [jnp.zeros((1, H & -H), jnp.float32)] * len(pieces)
    dscale, dbias = jax.lax.fori_loop(0, NORM_STEPS, step, (zero, zero))
    for c, a, b in zip(pieces, dscale, dbias):
        dscale_ref[:, c], dbias_ref[:, c] = a, b


def norm_call(x, g, dres, scale, eps):
    """Runs norm_kernel over blocks of rows, the last one padded with zero rows (whose gradients are 0).
    x, dres: (T, H) float32, g: (T, H), scale: (H,) -> dx (T, H), and dscale, dbias (nP, 1, H): the sums of
    each program's rows."""
    from jax.experimental import pallas as pl
    T, H = x.shape
    R = NORM_ROWS * NORM_STEPS
    nP = -(-T // R)
    rows, sums = pl.BlockSpec((R, H), lambda i: (i, 0)), pl.BlockSpec((None, 1, H), lambda i: (i, 0, 0))
    dx, dscale, dbias = pl.pallas_call(
        functools.partial(norm_kernel, eps=eps), grid=(nP,),
        in_specs=[rows, rows, rows, pl.BlockSpec((1, H), lambda i: (0, 0))], out_specs=[rows, sums, sums],
        out_shape=[jax.ShapeDtypeStruct((nP * R, H), jnp.float32)] + 2 * [jax.ShapeDtypeStruct((nP, 1, H), jnp.float32)],
        **compiled_on_gpu(num_warps=4),
    )(*(jnp.pad(a, ((0, nP * R - T), (0, 0))) for a in (x, g, dres)), scale[None].astype(jnp.float32))
    return dx[:T], dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def pre_norm(p, x, eps, dtype):
    """(x, LayerNorm(x) in dtype), x float32: x passes through unchanged so that the backward pass receives
    the residual path's gradient with LayerNorm's, and sums them in its one pass. Equal to autodiff of
    `layer_norm` (test: test_pre_norm_backward_equals_autodiff)."""
    return x, layer_norm(p, x, eps).astype(dtype)


def pre_norm_forward(p, x, eps, dtype):
    return pre_norm(p, x, eps, dtype), (p["scale"], x)


def pre_norm_backward(eps, dtype, saved, grads):
    scale, x = saved  # x: (L, batch, H)
    def rows(x, g, dres, scale):  # one device's (L, batch, H) arrays as rows of H
        dx, dscale, dbias = norm_call(*(a.reshape(-1, a.shape[-1]) for a in (x, g, dres)), scale, eps)
        return dx.reshape(x.shape), dscale, dbias
    dx, dscale, dbias = per_device(rows, (x, grads[1], grads[0], scale), (1, 1, 1, None), (1, 0, 0))
    return {"scale": dscale.sum((0, 1)), "bias": dbias.sum((0, 1))}, dx


pre_norm.defvjp(pre_norm_forward, pre_norm_backward)


# 5d. ---------------------------------------------------------------------------------------------------
# The tanh GELU, 0.5 x (1 + tanh u) with u = c (x + a x^3), computed as x s with s = sigmoid(2u) = (1 + tanh u) / 2:
# the same function, which XLA runs faster on GPUs (docs/performance.md). The backward pass keeps only the input:
# autodiff would keep the tanh and the product before it, two arrays to read back instead of one.
GELU_C, GELU_A = np.sqrt(2 / np.pi), 0.044715


def sigmoid_form(x):
    """x in float32 and s = sigmoid(2 c (x + a x^3)); the GELU is x s."""
    x = x.astype(jnp.float32)
    return x, 1 / (1 + jnp.exp(-2 * GELU_C * (x + GELU_A * x * x * x)))


@jax.custom_vjp
def gelu_fast(x):
    """jax.nn.gelu(x, approximate=True), in value and autodiff gradient (test:
    test_gelu_backward_is_the_derivative_of_gelu)."""
    x32, s = sigmoid_form(x)
    return (x32 * s).astype(x.dtype)


def gelu_forward(x):
    return gelu_fast(x), x


def gelu_backward(x, g):  # d/dx (x s) = s + x s (1 - s) 2c (1 + 3 a x^2)
    x, s = sigmoid_form(x)
    return ((g * (s + x * s * (1 - s) * (2 * GELU_C) * (1 + 3 * GELU_A * x * x))).astype(g.dtype),)


gelu_fast.defvjp(gelu_forward, gelu_backward)


# ----------------------------------------------------------------------------------------------------
# 6. Checkpoints: a folder with config.json and flax_model.msgpack, the official format, written and read with
# the official parameter names so that official checkpoints and ours are interchangeable.

ARCHITECTURES = {"mlm": "BiGSForMaskedLM", "classification": "BiGSForSequenceClassification",
                 "token_classification": "BiGSForTokenClassification",
                 "question_answering": "BiGSForQuestionAnswering", "multiple_choice": "BiGSForMultipleChoice"}

# Our parameter path prefix -> the official one. Layer entries sit under s4_bert/encoder/layer/<i>/.
OFFICIAL_NAMES = {
    "embeddings/word": "s4_bert/embeddings/word_embeddings/embedding",
    "embeddings/position": "s4_bert/embeddings/position_embeddings/embedding",
    "embeddings/token_type": "s4_bert/embeddings/token_type_embeddings/embedding",
    "embeddings/norm": "s4_bert/embeddings/LayerNorm",
    "layers/norm": "LayerNorm", "layers/W_v": "dv", "layers/W_f": "du_forward", "layers/W_b": "du_backward",
    "layers/W_uf": "duc_forward", "layers/W_ub": "duc_backward", "layers/W_l": "dol", "layers/W_o": "do",
    "layers/ssm_f": "fs4", "layers/ssm_b": "bs4",
    "pooler": "s4_bert/pooler/dense",
    "mlm/dense": "cls/predictions/transform/dense", "mlm/norm": "cls/predictions/transform/LayerNorm",
    "mlm/bias": "cls/predictions/bias", "mlm/decoder": "cls/predictions/decoder/kernel",
    "classifier": "classifier", "qa_outputs": "qa_outputs",
}


def flatten(tree, prefix=""):
    """{'a': {'b': x}} -> {'a/b': x}"""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}/{key}" if prefix else key).items()}


def unflatten(flat):
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def official_path(path, layer=None):
    prefix = max((k for k in OFFICIAL_NAMES if path == k or path.startswith(k + "/")), key=len)
    name = OFFICIAL_NAMES[prefix] + path[len(prefix):]
    return name if layer is None else f"s4_bert/encoder/layer/{layer}/{name}"


def to_official(params):
    """Our params -> {official '/'-joined path: array}, the layers unstacked."""
    out = {}
    for path, x in flatten(params).items():
        x = np.asarray(x)
        if path.startswith("layers/"):
            out.update({official_path(path, i): x[i] for i in range(x.shape[0])})
        else:
            out[official_path(path)] = x
    return out


# msgpack as Flax writes it: nested maps; each array an ext object (code 1) holding (shape, dtype name, bytes).
def _pack_array(x):
    import msgpack
    x = np.ascontiguousarray(x)
    return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes()), use_bin_type=True))


def _unpack_array(code, data):
    import msgpack
    if code != 1:
        raise ValueError(f"unsupported msgpack ext type {code} (only arrays, type 1, are expected)")
    shape, dtype, buffer = msgpack.unpackb(data, raw=False)
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)


def save_msgpack(path, flat):
    """Writes {'/'-joined path: array} as a Flax msgpack file, atomically (a temporary file, then a rename)."""
    import msgpack
    data = msgpack.packb(unflatten({k: _pack_array(v) for k, v in flat.items()}), use_bin_type=True)
    write_atomic(path, data)


def load_msgpack(path):
    import msgpack
    with open(path, "rb") as f:
        data = f.read()
    try:
        return flatten(msgpack.unpackb(data, ext_hook=_unpack_array, raw=False, strict_map_key=False))
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # truncated or not msgpack
        raise ValueError(f"{path}: not a complete Flax msgpack file ({e})") from e


def write_atomic(path, data):
    """Write bytes, or an iterable of bytes written in turn (a file too large to hold), to path so that a crash
    leaves either the old file or the new one, never half of one. Each call writes a file of its own first, so
    that processes writing the same path do not meet."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.chmod(tmp, 0o666 & ~umask())  # as open() would make it (mkstemp's is 0600): readable by other users
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def umask():
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def config_from_json(d):
    """Config from an official (or our) config.json dict; unknown keys are ignored, known ones must hold a value
    of their field's kind (a size a whole number of at least 1)."""
    if not isinstance(d, dict):
        raise ValueError(f"config.json holds a {type(d).__name__}, not a JSON object")
    for key, supported in (("hidden_act", "gelu"), ("pre_norm", True), ("position_embedding_type", "absolute")):
        if d.get(key, supported) != supported:
            raise ValueError(f"config.json has {key}={d[key]!r}; only {supported!r} is supported")
    names = {f.name for f in dataclasses.fields(Config)} - set(RUN_SETTINGS)  # older files may hold dtype, remat
    kwargs = {k: v for k, v in d.items() if k in names}
    if "id2label" in d:  # the official config writes num_labels only through id2label
        if not isinstance(d["id2label"], dict):
            raise ValueError(f"config.json has id2label={d['id2label']!r}, not a mapping")
        kwargs["num_labels"] = len(d["id2label"])
    for k, v in kwargs.items():
        default = getattr(Config, k)
        if isinstance(default, (bool, str)):
            ok, kind = type(v) is type(default), "true or false" if isinstance(default, bool) else "a string"
        elif isinstance(default, int):
            least = 0 if k == "pad_token_id" else 1
            ok, kind = type(v) is int and v >= least, f"a whole number of at least {least}"
        else:  # a float, or classifier_dropout (None: hidden_dropout_prob)
            ok = (default is None and v is None) or (type(v) in (int, float) and 0 <= v < float("inf"))
            kind = "a number of at least 0"
        if not ok:
            raise ValueError(f"config.json has {k}={v!r}, not {kind}")
    return Config(**kwargs)


def head_of(d):
    """The head named by a config.json's 'architectures' (default: mlm)."""
    arch = (d.get("architectures") or ["BiGSForMaskedLM"])[0]
    heads = {v: k for k, v in ARCHITECTURES.items()}
    if arch not in heads:
        raise ValueError(f"config.json names architecture {arch!r}; known: {', '.join(heads)}")
    return heads[arch]


def save_pretrained(path, config, params, head="mlm"):
    """Writes config.json (the model: every field but the RUN_SETTINGS) and flax_model.msgpack into the
    folder path (created if needed)."""
    os.makedirs(path, exist_ok=True)
    save_msgpack(os.path.join(path, "flax_model.msgpack"), to_official(params))
    d = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUN_SETTINGS}
    d.update(architectures=[ARCHITECTURES[head]], model_type="BiGS")
    if head == "classification":
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
    write_atomic(os.path.join(path, "config.json"), json.dumps(d, indent=2).encode())


def from_pretrained(path_or_hub_id, **overrides):
    """(config, params) from a checkpoint folder (official Flax or ours) or a hub id such as
    'JunxiongWang/BiGS_4096' (downloaded with huggingface_hub). overrides replace config fields, e.g.
    mask_padding=False, or the run settings dtype='bfloat16', remat=True, fast=False. Every parameter must be
    present with its expected shape."""
    path = path_or_hub_id
    if not os.path.isdir(path):
        if os.path.exists(path) or path.count("/") != 1:
            raise FileNotFoundError(f"{path}: not a checkpoint folder (config.json + flax_model.msgpack) nor a hub id")
        import huggingface_hub
        try:
            path = huggingface_hub.snapshot_download(path, allow_patterns=["config.json", "flax_model.msgpack"])
        except Exception as e:  # offline, or an id the hub does not have: many kinds of error
            raise FileNotFoundError(f"{path}: no such folder, and the hub cannot give it "
                                    f"({type(e).__name__}); offline, give a local checkpoint folder") from e
    files = [os.path.join(path, name) for name in ("config.json", "flax_model.msgpack")]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: missing (a checkpoint folder holds config.json and flax_model.msgpack)")
    with open(files[0], encoding="utf-8") as f:
        try:
            d = json.load(f)
        except ValueError as e:
            raise ValueError(f"{files[0]}: not valid JSON ({e})") from e
    try:
        config, head = dataclasses.replace(config_from_json(d), **overrides), head_of(d)
    except ValueError as e:  # the message begins 'config.json ...'
        raise ValueError(f"{os.path.dirname(files[0])}/{e}") from e
    found = load_msgpack(files[1])
    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0), head))
    flat = {}
    for ours, spec in flatten(expected).items():
        if ours.startswith("layers/"):
            names = [official_path(ours, i) for i in range(config.num_hidden_layers)]
            shape = spec.shape[1:]
        else:
            names, shape = [official_path(ours)], spec.shape
        arrays = []
        for name in names:
            if name not in found:
                raise ValueError(f"{files[1]}: parameter {name} is missing (expected shape {tuple(shape)})")
            x = found.pop(name)
            if x.shape != tuple(shape):
                raise ValueError(f"{files[1]}: parameter {name} has shape {x.shape}, config.json implies {tuple(shape)}")
            arrays.append(x)
        flat[ours] = jnp.asarray(np.stack(arrays) if ours.startswith("layers/") else arrays[0], spec.dtype)
    if found:
        raise ValueError(f"{files[1]}: unknown parameter(s) for {ARCHITECTURES[head]}: {', '.join(sorted(found))}")
    return config, unflatten(flat)


