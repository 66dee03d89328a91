"""Small sample datasets the project generates itself (no download, nothing from outside the project).

Used by ``make demo`` and quick tests: customer-support queries labelled with an intent,
and sentences labelled claim / not_claim. Generation is deterministic for a seed.

Example::

    from lorafleet.sample_data import write_intent_csv
    write_intent_csv("work/intents.csv", n_per_intent=60)
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

# intent -> templates; {x} is filled from the slot list of the intent.
INTENTS: dict[str, tuple[list[str], list[str]]] = {
    "card_arrival": (["When will my {x} arrive?", "My {x} still has not arrived", "How long does the {x} take to come?",
                      "I am still waiting for my {x}", "Where is my new {x}?", "Has my {x} been sent yet?"],
                     ["card", "new card", "debit card", "replacement card", "credit card"]),
    "lost_or_stolen_card": (["I lost my {x}", "Someone stole my {x}", "My {x} is missing, what do I do?",
                             "I can't find my {x} anywhere", "Please block my {x}, it was stolen", "I think I left my {x} at a shop"],
                            ["card", "wallet with my card", "debit card", "credit card", "bank card"]),
    "exchange_rate": (["What is the exchange rate for {x}?", "How much is one dollar in {x}?", "Which rate do you use for {x}?",
                       "Is the {x} rate good today?", "Tell me the current {x} exchange rate", "How do you convert to {x}?"],
                      ["euros", "pounds", "yen", "dollars", "francs"]),
    "top_up_failed": (["My {x} failed", "Why did my {x} not go through?", "The {x} was declined", "I tried a {x} and it did not work",
                       "Error when doing a {x}", "Can you tell me why the {x} was rejected?"],
                      ["top up", "top-up", "card top up", "bank top up", "top up by transfer"]),
    "balance_not_updated_after_bank_transfer": (["My balance did not update after the {x}", "The {x} is not showing in my balance", "Balance still old after {x}",
                             "Why is my balance the same after the {x}?", "I made a {x} but the balance is wrong", "When will the {x} show in my balance?"],
                            ["transfer", "deposit", "cheque", "payment", "bank transfer"]),
    "change_pin": (["How do I change my {x}?", "I want a new {x}", "Can I reset my {x}?", "Where can I update the {x}?",
                    "I forgot my {x}, can I change it?", "Help me set a different {x}"],
                   ["PIN", "pin number", "card PIN", "PIN code", "security PIN"]),
    "cancel_transfer": (["Please cancel my {x}", "I want to stop a {x}", "Can I undo the {x} I just made?", "How to reverse a {x}?",
                         "I sent a {x} by mistake, cancel it", "Stop the {x} to my friend"],
                        ["transfer", "payment", "bank transfer", "wire", "money transfer"]),
    "card_payment_fee_charged": (["Why was I charged a fee for a {x}?", "There is an extra fee on my {x}", "I paid a fee on a {x}",
                                  "What is this charge on my {x}?", "Fee applied to {x}, why?", "Do you charge for a {x}?"],
                                 ["card payment", "purchase", "shop payment", "online payment", "payment abroad"]),
}

CLAIMS = (["The {x} cures every disease.", "Studies prove that {x} doubles your lifespan.", "{x} causes more crime than anything else.",
           "Scientists confirmed that {x} is completely safe.", "{x} has increased by 50 percent since last year."],
          ["coffee", "the new vaccine", "social media", "electric cars", "the minimum wage", "green tea", "video games"])
NOT_CLAIMS = (["I had {x} this morning.", "Do you like {x}?", "Let's talk about {x} tomorrow.", "My friend bought {x} yesterday.",
               "What time is the {x} meeting?"],
              ["coffee", "green tea", "video games", "a bike", "the project", "lunch", "breakfast"])


def intent_rows(n_per_intent: int = 60, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for label, (templates, slots) in INTENTS.items():
        for _ in range(n_per_intent):
            text = rng.choice(templates).format(x=rng.choice(slots))
            if rng.random() < 0.3:
                text = rng.choice(["Hi, ", "Hello. ", "Please help: ", ""]) + text[0].lower() + text[1:]
            rows.append({"text": text, "category": label})
    rng.shuffle(rows)
    return rows


def claim_rows(n_per_label: int = 80, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for label, (templates, slots) in (("claim", CLAIMS), ("not_claim", NOT_CLAIMS)):
        for _ in range(n_per_label):
            text = rng.choice(templates).format(x=rng.choice(slots))
            rows.append({"text": text[0].upper() + text[1:], "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path: str | Path, rows: list[dict[str, str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_intent_csv(path, n_per_intent: int = 60, seed: int = 0) -> Path:
    return write_csv(path, intent_rows(n_per_intent, seed))


def write_claim_csv(path, n_per_label: int = 80, seed: int = 0) -> Path:
    return write_csv(path, claim_rows(n_per_label, seed))


def write_corpus(path: str | Path, seed: int = 1) -> Path:
    """Unlabelled text for pre-training the tiny base: the queries and sentences, without labels."""
    lines = [r["text"] for r in intent_rows(120, seed)] + [r["text"] for r in claim_rows(120, seed)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
