"""Masked-LM pretraining of BiGS, from a laptop CPU to many accelerators.

    python train.py --seq_len 4096                       # the embedded Wikipedia corpus, model 'small'
    python train.py --recipe gpu                          # the shipped checkpoint's run, on one GPU
    python train.py --benchmark --model large --seq_len 4096 --bf16      # train-step tokens/s

Top to bottom: the data (text, a tokenizer, blocks of token ids), masking and the loss, AdamW, the mesh and its
named shardings (axes 'data', over which the batch is split, and 'model'), the train step (one jax.jit), the
loop, the command line. What running for real needs is in running.py.
"""

import functools
import hashlib
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bigs
import running
from running import SPECIAL_TOKENS, UsageError

# ----------------------------------------------------------------------------------------------------
# Data: text -> a tokenizer (running.wordpiece) -> token ids -> blocks of seq_len tokens, [CLS] ... [SEP].


def token_stream(texts, count, tok, stem):
    """Tokenises the `count` documents of texts (batches; the tokenizer runs on all cores) and writes them, each
    followed by [SEP], as one flat file of token ids (stem.<dtype>: 16 bits a token where the vocabulary fits),
    once: a later run with the same corpus and tokenizer reads it. -> the stream, memory-mapped."""
    dtype = np.dtype(np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.int32)
    path = f"{stem}.{dtype}"
    if not os.path.exists(path):
        sep, t0 = tok.token_to_id("[SEP]"), time.perf_counter()

        def chunks():
            for batch in texts():
                docs = [e.ids + [sep] for e in tok.encode_batch(batch, add_special_tokens=False) if e.ids]
                yield (np.concatenate([np.asarray(d, dtype) for d in docs]) if docs else np.zeros(0, dtype)).tobytes()
        bigs.write_atomic(path, chunks())
        total = os.path.getsize(path) // dtype.itemsize
        print(f"train.py: tokenised {count} documents into {total:,} tokens in {time.perf_counter() - t0:.0f} s: {path}")
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
    """(tokenizer, train blocks, eval blocks). The non-empty documents are split at random (seed 0) into the
    eval split, a share --eval_fraction of them, and the train split, before they are cut into blocks."""
    corpus, source = running.read_corpus(args.dataset, args.dataset_config, args.text_column)
    batches = lambda positions: lambda: (running.documents(corpus, positions[i:i + 1000])
                                         for i in range(0, len(positions), 1000))  # a function: passes over them
    kept = np.array([i for start in range(0, len(corpus), 1000)
                     for i, t in enumerate(running.documents(corpus, range(start, min(start + 1000, len(corpus)))), start)
                     if t and t.strip()], np.int64)
    n_eval = math.ceil(args.eval_fraction * len(kept))
    if len(kept) - n_eval < 1:
        raise UsageError(f"the corpus {args.dataset} has {len(kept)} non-empty documents: too few for an eval split "
                         f"of --eval_fraction {args.eval_fraction} and a train split")
    if tok is None:  # the tokenizer of --tokenizer, else a WordPiece trained on the corpus
        tok = running.read_tokenizer(args.tokenizer) if args.tokenizer else \
            running.wordpiece(batches(kept), config.vocab_size, cache_dir, source)
    running.check_tokenizer(tok, config)
    order = kept[np.random.default_rng(0).permutation(len(kept))]
    split = {"train": order[n_eval:], "test": order[:n_eval]}
    key = hashlib.sha256(f"{source}|{tok.to_str()}|{args.eval_fraction}|stream-v1".encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    blocks = {name: Blocks(token_stream(batches(p), len(p), tok, os.path.join(cache_dir, f"ids-{key}-{name}")),
                           args.seq_len, cls, sep) for name, p in split.items()}
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
    """tokens (batch, L) -> inputs (batch, L), positions (batch, M), targets (batch, M), weights (batch, M) (0
    where a short sequence had fewer than M ordinary tokens). Of the M selected tokens, 10% become a random
    token, the share `unchanged` stays as it is and the rest become [MASK]: BERT's 80/10/10 at unchanged=0.1."""
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
                          masked_positions=positions)  # (batch, M, vocab)
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


def apply_gradients(state, loss, grads, groups, args, warmup, total):
    """What follows the gradients in train.py's step and finetune.py's: clip their global norm to
    args.clip_grad, take this update's learning rate, apply AdamW. A step whose loss, gradient norm or new
    parameters are not all finite is not applied: the state stays as it was, so it is finite whenever it is
    saved.  -> (new state, {'lr', 'grad_norm' (before clipping), 'applied'})."""
    step = state["step"] + 1
    grads, grad_norm = clip_by_global_norm(grads, args.clip_grad)
    lr = learning_rate(step, args.lr, warmup, total)
    params, opt = adamw_update(state["params"], grads, state["opt"], step, lr, groups, args.beta1, args.beta2,
                               args.eps, args.weight_decay)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    finite &= jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    state = dict(state, params=keep(params, state["params"]), opt=keep(opt, state["opt"]),
                 step=jnp.where(finite, step, state["step"]))
    return state, {"lr": lr, "grad_norm": grad_norm, "applied": finite}


# ----------------------------------------------------------------------------------------------------
# The device mesh and named shardings.


def make_mesh(spec):
    """A Mesh with axes ('data', 'model'), sized by --mesh ('data=4,model=2'; default: all devices on 'data')."""
    return Mesh(np.array(jax.devices()).reshape(running.mesh_sizes(spec, jax.device_count())), ("data", "model"))


def param_shardings(params, mesh):
    """Matrices are split along their last axis over 'model' where it divides; the rest is replicated."""
    m = mesh.shape["model"]
    def spec(x):
        if m > 1 and x.ndim >= 2 and x.shape[-1] % m == 0:
            return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model"))
        return NamedSharding(mesh, P())
    return jax.tree.map(spec, params)


def place(state, mesh):
    """(state, shardings): a train state (parameters, AdamW moments, step, dropout key) placed on the mesh."""
    replicated = NamedSharding(mesh, P())
    shardings = {"params": param_shardings(state["params"], mesh), "step": replicated, "key": replicated}
    shardings["opt"] = {"m": shardings["params"], "v": shardings["params"]}
    return running.put(state, shardings), shardings


def train_state(params, seed, mesh):
    return place({"params": params, "opt": adamw_init(params), "step": jnp.zeros((), jnp.int32),
                  "key": jax.random.key(seed)}, mesh)


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
        state, update = apply_gradients(state, jnp.sum(losses), grads, groups, args, args.warmup, args.steps)
        return state, {"loss": jnp.sum(losses), "accuracy": jnp.sum(corrects) / count, **update}

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
    size = min(batch_size, len(blocks))  # split over the data axis where it divides
    sharding = NamedSharding(mesh, P("data") if size % mesh.shape["data"] == 0 else P())
    for i in range(n):
        batch = running.global_array(blocks[i * batch_size + np.arange(size)], sharding)
        sums += [float(x) for x in eval_step(params, batch, jax.random.key(i))]
    return {"eval_loss": sums[0] / sums[2], "eval_accuracy": sums[1] / sums[2]}


def unigram_entropy(blocks, specials, vocab_size):
    """Entropy (nats) of the held-out tokens' own frequencies: the loss of a model that ignores context."""
    counts = sum(np.bincount(chunk, minlength=vocab_size) for chunk in blocks.tokens())
    counts[specials] = 0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------------------------------
# The loop: a step, a log row every --log_every steps, an evaluation every --eval_every, a checkpoint every
# --save_every and at the end; Ctrl-C saves and stops, a loss that is not finite stops.


def train_loop(args, config, state, tok, train_step, eval_step, mesh, train_blocks, eval_blocks, specials):
    start = int(state["step"])
    evaluate_now = lambda: evaluate(eval_step, state["params"], eval_blocks, args.batch_size, args.eval_batches, mesh)
    entropy = unigram_entropy(eval_blocks, specials, config.vocab_size)
    print(f"train.py: model {args.model or args.init} ({config.num_hidden_layers} x {config.hidden_size}, "
          f"{sum(x.size for x in jax.tree.leaves(state['params'])) / 1e6:.1f}M parameters, {config.dtype}), "
          f"{len(train_blocks)} train and {len(eval_blocks)} eval blocks of "
          f"{args.seq_len} tokens, batch {args.batch_size}, mesh {dict(mesh.shape)}, {jax.devices()[0].platform}")
    if start == 0:
        first_eval = evaluate_now()
        print(f"step 0: eval loss {first_eval['eval_loss']:.3f} (unigram entropy of the eval tokens: {entropy:.3f})")
    log, saves = running.RunLog(args.out, args.steps, start), running.Saves(args.out, config, tok, args, start)
    if start == 0:
        log.record(step=0, **first_eval)
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    micro = args.batch_size // args.grad_accum  # each process reads the rows it feeds of each micro-batch:
    rows = (np.arange(args.grad_accum)[:, None] * micro + running.process_rows(micro)).reshape(-1)
    t_start = time.perf_counter()
    with log, running.StopRequests() as stop:
        try:
            for step in range(start + 1, args.steps + 1):
                tokens = batch_at(train_blocks, step - 1, args.batch_size, args.seed, rows)
                tokens = tokens.reshape(args.grad_accum, -1, args.seq_len)
                state, metrics = train_step(state, jax.make_array_from_process_local_data(batch_sharding, tokens))
                if not metrics["applied"]:  # the state is step - 1's, finite: it is saved
                    log.bar.close()
                    saves.save(state)
                    raise running.NotFinite(f"step {step} was not applied: its loss ({float(metrics['loss']):.4g}), "
                                            f"gradient norm ({float(metrics['grad_norm']):.4g}) or new weights are not "
                                            f"finite; stopping. {saves.kept()}")
                log.step()
                if step % args.log_every == 0 or step == start + 1 or step == args.steps:
                    log.train_row(step, {k: v for k, v in metrics.items() if k != "applied"},
                                  args.batch_size * args.seq_len)
                if step % args.eval_every == 0 and step != args.steps:
                    result = evaluate_now()
                    log.record(step=step, **result)
                    log.bar.write(f"step {step}: eval loss {result['eval_loss']:.3f}, "
                                  f"accuracy {result['eval_accuracy']:.3f}")
                if step % args.save_every == 0:
                    saves.save(state)
                if stop.any():
                    log.bar.close()
                    saves.save(state)
                    print(f"\ntrain.py: interrupted; saved step {step} to {saves.link}; continue with: python "
                          f"train.py --out {args.out} --resume{running.process_flags(args)}", file=sys.stderr)
                    return 130
        except KeyboardInterrupt:  # a second Ctrl-C
            log.bar.close()
            print(f"\ntrain.py: interrupted again; the checkpoint of step {saves.step} is kept", file=sys.stderr)
            return 130
        log.bar.close()
        result = evaluate_now()
        log.record(step=args.steps, **result)
        saves.save(state)
    seconds = time.perf_counter() - t_start
    pictures = running.plot_run(args.out) if jax.process_index() == 0 else []
    print(f"done: {args.steps} steps ({args.steps - start} in this run, "
          f"{(args.steps - start) * args.batch_size * args.seq_len:,} tokens, {seconds:.0f} s); eval loss "
          f"{result['eval_loss']:.3f} (unigram entropy {entropy:.3f}), accuracy {result['eval_accuracy']:.3f}; "
          f"checkpoint {saves.link}; pictures {', '.join(pictures)}")
    return 0


# ----------------------------------------------------------------------------------------------------
# The command line. RECIPES: named runs; gpu, that of the shipped checkpoint (checkpoints/mini), an H100 minute.

RECIPES = {"gpu": dict(model="mini", dataset="general", seq_len=512, batch_size=64, steps=4000, lr=1e-3, warmup=300,
                       unchanged=0.1, bf16=True, eval_every=500, save_every=1000, out="runs/mini")}


def parse_args(argv):
    p = running.Parser("Masked-LM pretraining of BiGS.")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="a RECIPES run: its settings, for the flags not given")
    p.add_argument("--model", default="small", choices=sorted(bigs.PRESETS), help="a bigs.PRESETS model")
    p.add_argument("--init", default=None, metavar="CHECKPOINT", help="start from a checkpoint's weights (a folder "
                   "or hub id) with a fresh optimiser; its tokenizer.json or --tokenizer; a longer --seq_len repeats "
                   "its position embeddings")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch_size", type=int, default=None, help="sequences per step (global); default: 8192 tokens")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (same step, less memory)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--warmup", type=int, default=30, help="warmup steps (the paper: 2000)")
    p.add_argument("--unchanged", type=float, default=None, help="the share of the 15%% selected tokens left as "
                   "they are (10%% become random ones, the rest [MASK]); default: 0.7 below width 768, else BERT's 0.1")
    running.add_optimizer_flags(p, lr=2e-3, weight_decay=0.05, beta2=0.98,
                                lr_help="peak learning rate (the paper's large model: 6e-4)")
    p.add_argument("--ssm_lr_scale", type=float, default=None, help="learning-rate scale for the SSMs' A and step, "
                   "then without weight decay (S4: 0.1); default: like every other weight, as the official code")
    p.add_argument("--dataset", default="wiki-offline", help="an embedded corpus (running.CORPORA: wiki-offline, "
                   "general, general+tasks), a datasets hub name, or .txt / .json(l) files, comma-separated")
    p.add_argument("--dataset_config", help="the hub dataset's configuration name")
    p.add_argument("--text_column", default="text")
    p.add_argument("--tokenizer", default=None,
                   help="a vocab.txt, a tokenizer.json or a hub id; default: train a WordPiece on the corpus")
    p.add_argument("--eval_fraction", type=float, default=0.05, help="documents held out for evaluation")
    for name, every in (("eval_every", 200), ("save_every", 200), ("log_every", 10)):
        p.add_argument(f"--{name}", type=int, default=every)
    p.add_argument("--eval_batches", type=int, default=16, help="at most this many batches per evaluation")
    p.add_argument("--out", default="runs/bigs", help="output folder: checkpoint, metrics.jsonl")
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "bigs"))
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its settings; --steps "
                   "extends it, and flags such as --lr or --eval_every given here replace the saved ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmark", action="store_true", help="time the train step on random tokens, then exit")
    p.add_argument("--plot", metavar="FOLDER", help="draw losses.png and kernels.png for a run or checkpoint folder")
    running.add_device_flags(p)
    args = running.parse_with_given(p, argv)
    vars(args).update({k: v for k, v in RECIPES.get(args.recipe, {}).items() if k not in args.given})
    if args.batch_size is None:
        args.batch_size = max(1, 8192 // max(args.seq_len, 1))
    return args


def main(argv=None):
    return running.main("train.py", parse_args, run, argv)


def run(args):
    if args.plot:
        print("wrote", ", ".join(running.plot_run(args.plot)))
        return 0
    running.check_flags(args, running.PRETRAINING_RULES)
    running.start_processes(args)
    start = 0
    if not (args.resume or args.benchmark):
        running.check_no_run(args.out)
    if args.resume:
        resumed = running.resume(args)
        if resumed is None:
            return 0
        config, state, tok, args, start = resumed
    elif args.init:
        if "model" in args.given:
            raise UsageError("--init takes the model from the checkpoint: leave out --model")
        args.model = None  # the run's model is the checkpoint's
        config, params, tok, fresh = running.from_checkpoint(args.init, args.tokenizer, "mlm",
                                                             jax.random.key(args.seed), positions=args.seq_len)
        print(f"train.py: from {args.init}" + (f"; newly initialised: {', '.join(fresh)}" if fresh else ""))
    else:
        config, tok = bigs.PRESETS[args.model], None
    config = running.run_config(config, args)
    if args.unchanged is None:  # by the model's width; a run saved before the flag existed used BERT's 0.1
        args.unchanged = 0.1 if args.resume or config.hidden_size >= 768 else 0.7
    mesh = make_mesh(args.mesh)
    with jax.set_mesh(mesh):  # the kernels run on every device of it (bigs.per_device)
        running.check_pretraining(args, config, mesh)
        if not args.benchmark:
            tok, train_blocks, eval_blocks = load_data(args, config, os.path.expanduser(args.cache_dir), tok)
        if args.resume:
            state, shardings = place(state, mesh)
        else:
            if not args.init:
                params = bigs.init_params(config, jax.random.key(args.seed), "mlm")
            state, shardings = train_state(params, args.seed + 1, mesh)
        specials = running.special_ids(tok) if tok else np.arange(len(SPECIAL_TOKENS), dtype=np.int32)
        mask_id = tok.token_to_id("[MASK]") if tok else SPECIAL_TOKENS.index("[MASK]")
        train_step = make_train_step(config, args, jnp.asarray(specials), mask_id, state["params"], shardings, mesh)
        if args.benchmark:
            return running.benchmark(args, config, train_step, state, mesh, num_predictions(args.seq_len),
                                     len(SPECIAL_TOKENS))
        eval_step = make_eval_step(config, jnp.asarray(specials), mask_id)
        with running.claim(args.out, fresh=start == 0):
            if jax.process_index() == 0 and start:
                running.resume_folder(args.out, start)
            return train_loop(args, config, state, tok, train_step, eval_step, mesh, train_blocks, eval_blocks,
                              specials)


if __name__ == "__main__":
    sys.exit(main())
