"""Tests of bigs.py: each claim of the model checked against a reference (the official implementation's
outputs, a float64 formula, a recurrence, or a second computation of the same thing).

Run: python -m pytest -q test_bigs.py
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bigs

HERE = os.path.dirname(os.path.abspath(__file__))
OFFICIAL = os.path.join(HERE, "testdata", "official_tiny")
IO = dict(np.load(os.path.join(OFFICIAL, "io.npz")))


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
    out = bigs.forward(params, config, ids, mask, types, head=head)
    assert out.shape == ref.shape
    assert max_rel(out, ref) < 2e-5


def test_each_layer_equals_official():
    config, params = official("mlm")
    hs = IO["mlm_hidden_states"]  # (layers + 1, B, L, H)
    x = bigs.embed(params["embeddings"], config, IO["input_ids"], IO["token_type_ids"], rng=None)
    assert max_rel(x, hs[0]) < 2e-5
    for i in range(config.num_hidden_layers):
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        assert max_rel(bigs.bigs_layer(layer, hs[i], None, config), hs[i + 1]) < 2e-5
    config, params = official("cls")
    h = bigs.encode(params, config, IO["input_ids"], IO["attention_mask"], IO["token_type_ids"])
    assert max_rel(h, IO["cls_last_hidden_state"]) < 2e-5
    assert max_rel(bigs.pool(params["pooler"], config, h, IO["attention_mask"]), IO["cls_pooler_output"]) < 2e-5


def test_official_model_leaks_padding_and_mask_padding_stops_it():
    """Outputs at the 40 real positions must not depend on how many pads follow them."""
    config, params = official("mlm")  # mask_padding=True, the default
    ids, types = IO["unpadded_input_ids"], IO["unpadded_token_type_ids"]
    ref = np.asarray(bigs.forward(params, config, ids, None, types, head="mlm"))  # (2, 40, V), no pads
    for length in (41, 47, 64):
        pad = ((0, 0), (0, length - 40))
        p_ids, p_types = np.pad(ids, pad), np.pad(types, pad)
        p_mask = np.pad(np.ones_like(ids), pad)
        out = bigs.forward(params, config, p_ids, p_mask, p_types, head="mlm")[:, :40]
        assert max_rel(out, ref) < 1e-5, length
        leaky = bigs.forward(params, dataclasses.replace(config, mask_padding=False), p_ids, p_mask, p_types,
                             head="mlm")[:, :40]
        assert max_rel(leaky, ref) > 1e-2, length  # the official behaviour: pads change real tokens


def test_bfloat16_tracks_float32():
    for head_dir, head, key in (("mlm", "mlm", "mlm_logits"), ("cls", "classification", "cls_logits")):
        config, params = official(head_dir, dtype="bfloat16")
        out = bigs.forward(params, config, IO["input_ids"], IO["attention_mask"], IO["token_type_ids"], head=head)
        assert out.dtype == jnp.float32
        err = max_rel(out, IO[key])
        assert 1e-5 < err < 1e-2, err  # visibly bfloat16, and within 1%


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
    u = jax.random.normal(jax.random.key(100 + L), (2, L, 3))
    conv = np.asarray(bigs.ssm(p, u))
    rec = np.asarray(bigs.ssm_recurrent(p, u))
    assert max_rel(conv, rec) < 1e-5
    K = np.float64(bigs.ssm_kernel(p, L))
    u64 = np.float64(u)
    direct = np.stack([np.stack([np.convolve(u64[b, :, h], K)[:L] for h in range(3)], -1) for b in range(2)])
    direct += np.float64(p["D"]) * u64
    assert max_rel(conv, direct) < 1e-5


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


def test_lin_inv_initialisation_and_statistics():
    N = 4
    np.testing.assert_allclose(bigs.ssm_init(jax.random.key(0), N, "lin")["A_im"], np.pi * np.arange(N), rtol=1e-6)
    n = np.arange(N)
    np.testing.assert_allclose(bigs.ssm_init(jax.random.key(0), N, "inv")["A_im"],
                               N / np.pi * (N / (2 * n + 1) - 1), rtol=1e-6)
    config = dataclasses.replace(bigs.PRESETS["tiny"], vocab_size=5000, num_ssm=64, num_hidden_layers=8)
    p = bigs.init_params(config, jax.random.key(0))
    assert abs(float(p["embeddings"]["word"].std()) - 0.02) < 1e-3
    assert abs(float(p["layers"]["W_v"]["kernel"].std()) - 0.02) < 1e-3
    ssm = p["layers"]["ssm_f"]
    assert abs(float(ssm["C"].std()) - np.sqrt(0.5)) < 0.05
    assert np.all(ssm["A_re"] == -0.5) and np.all(ssm["D"] == 1)
    assert np.log(0.01) <= float(ssm["log_step"].min()) and float(ssm["log_step"].max()) <= 0
    assert float(ssm["log_step"].std()) > 0.5  # drawn per layer, not one value for all
    with pytest.raises(ValueError, match="scaling"):
        bigs.init_params(dataclasses.replace(config, scaling="diag"), jax.random.key(0))


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
    f = jax.jit(bigs.forward, static_argnames=("config", "head", "train"))
    out = f(params, TINY, ids, mask, head=head)
    expected = {"mlm": (2, 16, 1000), "classification": (2, 2), "token_classification": (2, 16, 2),
                "question_answering": (2, 16), "multiple_choice": (2, 3)}[head]
    for o in out if head == "question_answering" else [out]:
        assert o.shape == expected
    eager = bigs.forward(params, TINY, ids, mask, head=head)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(eager)):
        np.testing.assert_allclose(a, b, atol=1e-5)

    def loss(params, rng):
        out = bigs.forward(params, TINY, ids, mask, head=head, train=True, rng=rng)
        return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out))

    grads = jax.jit(jax.grad(loss))(params, jax.random.key(2))
    for path, g in bigs.flatten(grads).items():
        assert np.all(np.isfinite(g)), path
    for name in ("log_step", "A_im", "C"):  # gradients reach both SSMs of every layer
        for direction in ("ssm_f", "ssm_b"):
            assert np.all(np.abs(grads["layers"][direction][name]).max(axis=-1) > 0), (direction, name)


def test_multiple_choice_scores_each_choice_as_its_own_sequence():
    config = dataclasses.replace(TINY, num_labels=1)
    params = bigs.init_params(config, jax.random.key(0), "multiple_choice")
    ids, mask = head_inputs("multiple_choice", jax.random.key(1))
    mc = bigs.forward(params, config, ids, mask, head="multiple_choice")
    for c in range(3):
        one = bigs.forward(params, config, ids[:, c], mask[:, c], head="classification")[:, 0]
        np.testing.assert_allclose(mc[:, c], one, atol=1e-6)


def test_mlm_logits_at_masked_positions_equal_full_logits():
    config, params = official("mlm")
    full = bigs.forward(params, config, IO["input_ids"], head="mlm")
    positions = jnp.array([[3, 0, 63], [5, 5, 17]])
    some = bigs.forward(params, config, IO["input_ids"], head="mlm", masked_positions=positions)
    np.testing.assert_allclose(some, jnp.take_along_axis(full, positions[..., None], axis=1), atol=1e-5)


def test_dropout_only_in_training_and_driven_by_rng():
    config, params = official("cls")
    args = (params, config, IO["input_ids"], IO["attention_mask"], IO["token_type_ids"])
    evaluation = bigs.forward(*args, head="classification")
    a = bigs.forward(*args, head="classification", train=True, rng=jax.random.key(0))
    b = bigs.forward(*args, head="classification", train=True, rng=jax.random.key(0))
    c = bigs.forward(*args, head="classification", train=True, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - evaluation).max() > 1e-3
    no_dropout = dataclasses.replace(config, hidden_dropout_prob=0.0)
    np.testing.assert_allclose(bigs.forward(params, no_dropout, *args[2:], head="classification", train=True,
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
    logits = bigs.forward(params, config, jnp.asarray([ids]), head="mlm")[0, ids.index(4)]
    assert result[0][0][0] == tok.id_to_token(int(jnp.argmax(logits)))
    np.testing.assert_allclose(probs[0], float(jax.nn.softmax(logits).max()), rtol=1e-5)
