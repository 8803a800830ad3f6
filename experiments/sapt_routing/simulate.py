"""Routing-only simulation of SAPT's task attention on real pooled prompt embeddings (CPU, seconds).

SAPT's attention depends only on the frozen input embeddings, the query network and the task keys,
so its training can be replayed without the language model: the losses that reach the attention
are ARM's KL on the past tasks' pseudo-inputs and, with ``current_ratio``, the current task's
routing KL (the cross-entropy's pull is left out: it is ~0 while the current LoRA is still zero).
This isolates why routing fails or works for a given budget. Used for experiments/sapt_routing/README.md
and experiments/sapt/RESULTS.md. Options: ``kl_ratio``, ``current_ratio``, ``epochs``, ``batch``,
``lr``, ``seed``, ``n_train``, ``pseudo_fraction``, ``pseudo_capacity``, and ``fit_epochs`` /
``fit_kl`` / ``fit_batch`` (SAPT's ``route_epochs`` / ``route_kl_ratio`` / ``route_batch``: passes before
each task's epochs; ``fit_batch`` defaults to ``batch``).

    PYTHONPATH=$PWD python experiments/sapt_routing/simulate.py features std --root ../shared/benchmarks/CL_Benchmark
    PYTHONPATH=$PWD python experiments/sapt_routing/simulate.py train std '{"current_ratio": 1, "epochs": 3}'
    PYTHONPATH=$PWD python experiments/sapt_routing/simulate.py probe long4

``probe``: a softmax classifier over all tasks at once (no continual learning) on the same pooled
features: the routing any linear router on them could reach, an upper bound for SAPT's.
"""
import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.kernels import attention_select

STREAMS = {"std": ("cl_benchmark", ["dbpedia", "amazon", "agnews"], 1800, 64, 1.0, 2.0),  # train, batch, epochs, kl
           "std_no_task_lines": ("cl_benchmark", ["dbpedia", "amazon", "agnews"], 1800, 64, 1.0, 2.0),
           "wordnet": ("bundled", "wordnet", 540, 16, 2.0, 1.0),
           "long4": ("cl_benchmark", ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon",
                                      "SST-2", "dbpedia", "agnews", "MultiRC"], 450, 32, 1.0, 2.0),
           "sni": ("superni", "superni_order1", 180, 32, 2.0, 1.0)}
NO_TASK_LINES = {"std_no_task_lines"}  # prompts without their "Task:" / "Dataset:" lines


def features(stream: str, root, path: str) -> None:
    """Max-pooled input embeddings (SmolLM2, first 256 prompt tokens) of train and test prompts."""
    from jaxcl import load_model
    from jaxcl.data import load_stream

    source, order, n_train, *_ = STREAMS[stream]
    lines = stream not in NO_TASK_LINES
    tasks = load_stream(source, order, root, task_name=lines, dataset_name=lines)
    model, tokenizer = load_model("default")
    table = np.asarray(model.embed_inputs(jnp.arange(model.config.vocab_size)[None])[0], np.float32)
    pooled = lambda examples: np.stack([table[tokenizer(e.prompt)["input_ids"][:256]].max(0) for e in examples])
    np.savez(path, *[pooled(split) for t in tasks for split in (t.train[:n_train], t.test[:500])])


def train(stream: str, path: str, options: dict) -> dict:
    """Trains query network + keys task after task as SAPT does; routing after the last task."""
    _, _, _, batch, epochs, kl = STREAMS[stream]
    batch, epochs = options.get("batch", batch), options.get("epochs", epochs)
    kl, current = options.get("kl_ratio", kl), options.get("current_ratio", 0.0)
    fraction, capacity, lr = options.get("pseudo_fraction", 0.02), options.get("pseudo_capacity", 32), options.get("lr", 1e-3)
    z = np.load(path)
    arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    trains, tests = arrays[0::2], arrays[1::2]
    if "n_train" in options:  # the first n training prompts of each task (bench/cl_std3.yaml: 900)
        trains = [t[: options["n_train"]] for t in trains]
    num_tasks, d = len(trains), trains[0].shape[1]
    k_query, k_keys = jax.random.split(jax.random.PRNGKey(options.get("seed", 0)))
    query = attention_select.query_init(k_query, d, 100)
    keys = jax.vmap(lambda k: attention_select.task_key_init(k, d))(jax.random.split(k_keys, num_tasks))
    logits = lambda q, ks, e, c: attention_select.attention_logits(ks, attention_select.query(q, jnp.asarray(e)),
                                                                   jnp.arange(num_tasks) <= c)
    targets, pseudo, tx = np.zeros((num_tasks, num_tasks), np.float32), [], optax.adam(lr)
    # SAPT's routing fit (``route_epochs``): fit_epochs passes with ARM at fit_kl before the task's epochs
    fit_epochs, fit_kl = options.get("fit_epochs", 0), options.get("fit_kl", 1.0)
    fit_batch = options.get("fit_batch", batch)
    for c in range(num_tasks):
        def loss(p, rows, w, c=c):
            ks = keys.at[c].set(p["key"])
            total = sum(w * attention_select.kl_to_target(logits(p["query"], ks, pseudo[i], c), jnp.asarray(targets[i]))
                        for i in range(c))
            if current:
                total = total + current * attention_select.kl_to_target(logits(p["query"], ks, rows, c),
                                                                        jax.nn.one_hot(c, num_tasks))
            return total

        @jax.jit
        def step(p, opt, rows, w):
            grads = jax.grad(loss)(p, rows, w)
            updates, opt = tx.update(grads, opt, p)
            return optax.apply_updates(p, updates), opt

        p = {"query": query, "key": keys[c]}
        opt, rng, n = tx.init(p), np.random.default_rng(c), len(trains[c])
        if c > 0:  # the fit has its own Adam state, as SAPT's
            fit_opt = tx.init(p)
            for _ in range(math.ceil(n / fit_batch) * int(fit_epochs)):
                p, fit_opt = step(p, fit_opt, trains[c][rng.integers(0, n, fit_batch)], fit_kl)
        if c > 0 or current:  # task 0 alone has nothing to learn without the routing term
            for _ in range(math.ceil(n / batch) * int(epochs)):
                p, opt = step(p, opt, trains[c][rng.integers(0, n, batch)], kl)
        query, keys = p["query"], keys.at[c].set(p["key"])
        targets[c] = np.asarray(jax.nn.softmax(logits(query, keys, trains[c][-180:], c), -1).mean(0))
        m = int(np.clip(round(fraction * n), 4, capacity))
        pseudo.append(trains[c][np.linspace(0, n - 1, m).round().astype(int)])
    routing = [float(np.mean(np.asarray(jnp.argmax(logits(query, keys, tests[j], num_tasks - 1), -1)) == j) * 100)
               for j in range(num_tasks)]
    return {"stream": stream, "options": options, "routing_last": [round(r, 1) for r in routing],
            "targets": targets.round(2).tolist()}


def probe(stream: str, path: str, options: dict) -> dict:
    """Per-task test routing of a jointly trained softmax classifier on the pooled features."""
    z = np.load(path)
    arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    trains, tests = arrays[0::2], arrays[1::2]
    x = np.concatenate(trains)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    y = np.concatenate([np.full(len(t), i) for i, t in enumerate(trains)])
    w = {"w": jnp.zeros((x.shape[1], len(trains))), "b": jnp.zeros(len(trains))}
    tx = optax.adam(options.get("lr", 1e-2))
    xs, ys = jnp.asarray((x - mean) / scale), jax.nn.one_hot(y, len(trains))

    @jax.jit
    def step(w, opt):
        grads = jax.grad(lambda w: optax.softmax_cross_entropy(xs @ w["w"] + w["b"], ys).mean())(w)
        updates, opt = tx.update(grads, opt, w)
        return optax.apply_updates(w, updates), opt

    opt = tx.init(w)
    for _ in range(options.get("steps", 2000)):
        w, opt = step(w, opt)
    routing = [float(np.mean(np.argmax(((t - mean) / scale) @ np.asarray(w["w"]) + np.asarray(w["b"]), -1) == j) * 100)
               for j, t in enumerate(tests)]
    return {"stream": stream, "options": options, "probe_routing": [round(r, 1) for r in routing]}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("features", "train", "probe"))
    p.add_argument("stream", choices=sorted(STREAMS))
    p.add_argument("options", nargs="?", default="{}")
    p.add_argument("--root")
    p.add_argument("--features", default=None, help="the .npz file (default /tmp/sapt_features_<stream>.npz)")
    a = p.parse_args()
    path = a.features or f"/tmp/sapt_features_{a.stream}.npz"
    if a.what == "features":
        features(a.stream, a.root, path)
    else:
        print(json.dumps((train if a.what == "train" else probe)(a.stream, path, json.loads(a.options))))
