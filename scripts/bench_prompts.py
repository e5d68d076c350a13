"""The prompts the benchmark's cases use: pieces of tokenizer/corpus.txt (the mixed prompts, the
prefix cases' system prompt and shared prefix) and the texts of the speculation cases."""

import random

from bench_systems import ROOT

GROUNDED_DOCUMENT = (  # ~500 tokens, and tasks over it whose answers repeat it
    "The Riverside Cooperative: annual report\n\n"
    "The Riverside Cooperative ran three projects this year. The first, a community garden on Elm Street, opened in "
    "March with forty plots, a shared tool shed and a rain barrel on every corner. By August every plot was taken, and "
    "twelve families were on the waiting list. The garden gave away about three hundred kilograms of vegetables to the "
    "food bank on Harbor Road, mostly tomatoes, beans and squash.\n\n"
    "The second project, a repair café, met every second Saturday in the basement of the public library. Volunteers "
    "fixed over two hundred items, mostly lamps, bicycles, toasters and small kitchen appliances, and taught visitors "
    "how to replace a fuse, patch a tire and sew on a button. The café kept a notebook of every repair; about four in "
    "five items left the basement working again.\n\n"
    "The third project, a bulk-buying club for dried goods, now serves sixty households. Members order rice, lentils, "
    "oats, flour and coffee once a month, and the club buys them by the sack from two farms in the valley. Members "
    "saved about a fifth on their grocery bills, and the club's delivery van made one trip a month instead of sixty.\n\n"
    "The board thanks the volunteers who made this possible, especially Maria Gonzalez, who coordinated the garden, "
    "Tom Becker, who ran the repair café, and Aisha Rahman, who kept the accounts of the buying club. Next year the "
    "cooperative plans to add a seed library, to open the repair café on Wednesday evenings as well, and to start a "
    "tool lending shelf in the garden shed. The budget for next year is twelve thousand dollars, of which five thousand "
    "go to the garden, four thousand to the café and three thousand to the buying club.\n\n"
    "Members can vote on the budget at the general meeting on the first Monday of June, at seven in the evening, in the "
    "library's main hall. Members who cannot attend may vote by mail; ballots must arrive by the last Friday of May."
)
GROUNDED_TASKS = ("Repeat the following text exactly, word for word:",
                  "Copy the paragraph about the repair café from this report:",
                  "Rewrite this report in the present tense:", "Copy the last two paragraphs of this report:",
                  "Fix any spelling mistakes in this report and return the whole text:",
                  "Quote the sentences of this report that mention money:",
                  "Copy the paragraph about the garden from this report:",
                  "Return this report with every paragraph shortened a little:")
CHAT_QUESTIONS = ("Write a short story about a dragon who learns to cook.", "Why is the sky blue?",
                  "Give me three tips for learning a new language.", "What is the difference between a virus and a bacterium?",
                  "Describe a perfect weekend in the mountains.", "How do I make a good cup of tea?",
                  "Explain how a bicycle stays upright.", "Write a poem about the sea.")


def corpus_pieces(tokenizer_encode, n, length, seed=0):
    """n token lists cut from tokenizer/corpus.txt at seeded random places, each length(rng) long."""
    ids = tokenizer_encode((ROOT / "tokenizer" / "corpus.txt").read_text(encoding="utf-8")[:400_000])
    rng = random.Random(seed)
    pieces = []
    for _ in range(n):
        size = length(rng)
        start = rng.randrange(len(ids) - size)
        pieces.append(ids[start : start + size])
    return pieces


def mixed_prompts(tokenizer_encode, n, seed=0):
    """n token lists of 5-300 tokens cut from tokenizer/corpus.txt at seeded random places."""
    return corpus_pieces(tokenizer_encode, n, lambda rng: rng.randint(5, 300), seed)

