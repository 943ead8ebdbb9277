"""Choose the 3-layer MiniLM student's kept layers and distillation losses on a held-out cosine.

The held-out set is the first 256 R8 *training* documents (64 tokens), kept out of the
distillation chunks; R8's test documents (the probe's) are never used. Two modes::

    python benchmarks/minilm_screen.py layers     # cosine of every 3-of-6 subset, untrained
    python benchmarks/minilm_screen.py train 100 '{"keep": [0, 4, 5], "tokens": 1.0, ...}' ...

``train STEPS SPEC...``: each JSON spec (``keep`` plus ``distill_embeddings_`` options) is
distilled for STEPS batches of 16 from 4,000 chunks of R8 + R52 + 20 Newsgroups + Austen text
(``benchmarks/minilm.py``'s ``student_texts``), one JSON line per spec. A selection aid with
short runs: a ranking after 100 steps need not hold after thousands.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import minilm  # noqa: E402

from lighten.llm.embedding import corpus_documents, mean_cosine  # noqa: E402
from lighten.llm.encoder import prune_encoder_  # noqa: E402
from lighten.llm.encoder_distill import distill_embeddings_  # noqa: E402


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mode = argv[0]
    model, tok = minilm.load()
    model.eval()
    held = corpus_documents("r8", "train")[0][:256]
    held_batches = minilm.batches_of(tok, held, 64, 64)
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in held_batches])

    def cosine(m) -> float:
        with torch.no_grad():
            return mean_cosine(torch.cat([m(*b) for b in held_batches]), reference)

    if mode == "layers":
        for keep in itertools.combinations(range(6), 3):
            student = copy.deepcopy(model)
            prune_encoder_(student, [], keep_layers=list(keep))
            print(keep, round(cosine(student), 4), flush=True)
        return
    args = minilm.parse_args(["--student-corpus", "r8,r52,20ng,austen",
                              "--student-chunks", "4000"])
    texts = minilm.student_texts(args, set(held) | set(corpus_documents("r8", "test")[0]))
    batches = minilm.length_batches(tok, texts, 64, 16)
    steps = int(argv[1])
    for spec in argv[2:]:
        kw = json.loads(spec)
        keep = kw.pop("keep", [0, 2, 4])
        student = copy.deepcopy(model)
        prune_encoder_(student, [], keep_layers=keep)
        cpu, wall = time.process_time(), time.time()
        history = distill_embeddings_(student, model, batches, epochs=steps / len(batches), **kw)
        print(json.dumps({"keep": keep, **kw, "steps": steps, "cos": round(cosine(student), 4),
                          "loss": [round(h, 4) for h in history],
                          "cpu_s": round(time.process_time() - cpu),
                          "wall_s": round(time.time() - wall)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
