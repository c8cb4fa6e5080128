"""A linear probe of what a checkpoint's encoder knows about a topic task: the mean over each text's tokens of the
embeddings and of each layer's output, a softmax regression on --train_limit training texts (three strengths
of L2, features standardised), accuracy on the task's test split. `random` probes a freshly drawn model of the
`mini` shape with the given tokenizer. Reference forms on the CPU, max 128 tokens a text.

    python docs/probe.py checkpoints/mini bbc 100
    python docs/probe.py random bbc 100 checkpoints/mini/tokenizer.json"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax
import jax.numpy as jnp
import numpy as np

import bigs
import finetune
import running

checkpoint, task_name, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
task = finetune.TASKS[task_name]
data = finetune.load_task_data(finetune.parse_args(["--task", task_name, "--train_limit", str(limit)]), task)
if checkpoint == "random":
    config = dataclasses.replace(bigs.PRESETS["mini"], fast=False)
    params, tok = bigs.init_params(config, jax.random.key(0)), running.read_tokenizer(sys.argv[4])
else:
    config, params = bigs.from_pretrained(checkpoint, fast=False)
    tok = running.read_tokenizer(os.path.join(checkpoint, "tokenizer.json"))


@jax.jit
def features(params, ids, mask):  # (layers + 1, batch, H): the masked mean after the embeddings and each layer
    m = mask.T[..., None].astype(jnp.float32)
    x = bigs.embed(params["embeddings"], config, ids.T, jnp.zeros_like(ids).T, None)
    out = [(x * m).sum(0) / m.sum(0)]
    for p in bigs.unstack(params["layers"], config.num_hidden_layers):
        x = bigs.bigs_layer(p, x, m, config)
        out.append((x * m).sum(0) / m.sum(0))
    return jnp.stack(out)


def encode(split):
    examples = finetune.tokenize(tok, data[split], 128)
    return np.concatenate([np.asarray(features(params, *finetune.pad_batch(examples[i:i + 64])[:2]))
                           for i in range(0, len(examples), 64)], axis=1)


def probe(X, y, Xt, yt, l2, steps=500, lr=0.1):
    mu, sd = X.mean(0), X.std(0) + 1e-6
    X, Xt, Y = (X - mu) / sd, (Xt - mu) / sd, np.eye(len(task.labels))[y]
    W, b = np.zeros((X.shape[1], Y.shape[1])), np.zeros(Y.shape[1])
    for _ in range(steps):  # gradient descent on the mean cross-entropy plus l2/2 |W|^2
        z = X @ W + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        W -= lr * (X.T @ (p - Y) / len(X) + l2 * W)
        b -= lr * (p - Y).mean(0)
    return float(((Xt @ W + b).argmax(1) == yt).mean())


train, test = encode("train"), encode(task.eval_splits[0])
for layer in range(train.shape[0]):
    accuracy = [probe(train[layer], data["train"]["label"], test[layer], data[task.eval_splits[0]]["label"], l2)
                for l2 in (1e-3, 1e-2, 1e-1)]
    print(f"{checkpoint} {'embeddings' if layer == 0 else f'layer {layer}'}: " + " ".join(f"{a:.3f}" for a in accuracy))
