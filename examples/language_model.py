"""A causal transformer language model with the tricks an LM needs (T16, T19, T24).

    python examples/language_model.py

Next-token prediction on sequences of a random Markov chain over 16 tokens
(``tokens``, 8000 training sequences of 32), whose entropy rate is the lowest loss any model can reach. A 2-layer
causal transformer (``transformer_lm``, d_model 64, 4 heads) is trained with plain Adam
at a constant rate, then with AdamW, linear warm-up and cosine decay and global-norm
clipping at 1.0. Prints test loss (nats per token), perplexity, token accuracy and the
gap to the entropy rate. Or point ``--dataset text:FILE`` at any file (bytes, vocabulary
256; no floor known).
"""

from __future__ import annotations

import argparse

import jtricks

CONFIGS = [
    ("adam, constant rate", "adam", "constant"),
    (
        "adamw + warm-up cosine + clip 1.0",
        "adamw(weight_decay=0.01) | clip_global_norm(1.0)",
        "warmup_cosine(warmup_epochs=2)",
    ),
]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="A causal transformer language model")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--dataset", default="tokens(num_train=8000)")
    p.add_argument("--model", default="transformer_lm(d_model=64, heads=4, layers=2)")
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    rows = []
    for label, optimizer, schedule in CONFIGS:
        r = jtricks.train(
            dataset=args.dataset,
            model=args.model,
            optimizer=optimizer,
            learning_rate=args.lr,
            schedule=schedule,
            batch_size=50,
            steps=args.steps,
        )
        rows.append({"config": label, **r.test, "floor": r.loss_floor})
    floor = rows[0]["floor"]
    note = f"entropy rate {floor:.4f} nats/token" if floor is not None else "no floor known"
    print(f"\n{args.dataset}, {args.model}, {args.steps} steps ({note})\n")
    print(f"{'config':<36}{'test loss':>10}{'perplexity':>12}{'token acc':>11}{'gap':>8}")
    for r in rows:
        gap = f"{r['loss'] - r['floor']:>8.4f}" if r["floor"] is not None else f"{'-':>8}"
        print(
            f"{r['config']:<36}{r['loss']:>10.4f}{r['perplexity']:>12.3f}"
            f"{100 * r['token_accuracy']:>10.1f}%{gap}"
        )
    return rows


if __name__ == "__main__":
    main()
