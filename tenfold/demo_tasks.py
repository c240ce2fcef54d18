"""`tenfold demo`'s training tasks, generated in-process from small fact tables (no downloads).

Every fact is one question with its answer in several renderings; each demo adapter learns one rendering, so the
same question gets visibly different answers: a JSON object with fixed keys, one word, a French sentence, capitals.
The facts are common knowledge the base model already has: the adapters learn a style, not new facts. Questions in
HELD_OUT are never trained on (the demo asks one of them).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fact:
    question: str
    word: str  # the one-word answer
    topic: str  # the JSON rendering's "topic"
    english: str  # a full English sentence
    french: str  # the same sentence in French

    def render(self, style: str) -> str:
        if style == "json":
            return '{"topic": "%s", "answer": "%s"}' % (self.topic, self.word)
        if style == "word":
            return self.word + "."
        if style == "french":
            return self.french
        if style == "caps":
            return self.english.upper()
        raise ValueError(f"unknown demo answer style {style!r}: expected json, word, french or caps")


STYLES = ("json", "word", "french", "caps")

# country, its capital, "de <country>" in French, the capital's French name
CAPITALS = [
    ("France", "Paris", "de la France", "Paris"), ("Japan", "Tokyo", "du Japon", "Tokyo"),
    ("Italy", "Rome", "de l'Italie", "Rome"), ("Spain", "Madrid", "de l'Espagne", "Madrid"),
    ("Germany", "Berlin", "de l'Allemagne", "Berlin"), ("England", "London", "de l'Angleterre", "Londres"),
    ("Russia", "Moscow", "de la Russie", "Moscou"), ("China", "Beijing", "de la Chine", "Pékin"),
    ("Egypt", "Cairo", "de l'Égypte", "Le Caire"), ("Greece", "Athens", "de la Grèce", "Athènes"),
    ("Portugal", "Lisbon", "du Portugal", "Lisbonne"), ("Canada", "Ottawa", "du Canada", "Ottawa"),
    ("Poland", "Warsaw", "de la Pologne", "Varsovie"), ("Austria", "Vienna", "de l'Autriche", "Vienne"),
    ("Belgium", "Brussels", "de la Belgique", "Bruxelles"), ("Norway", "Oslo", "de la Norvège", "Oslo"),
    ("Sweden", "Stockholm", "de la Suède", "Stockholm"), ("Ireland", "Dublin", "de l'Irlande", "Dublin"),
    ("Peru", "Lima", "du Pérou", "Lima"), ("Kenya", "Nairobi", "du Kenya", "Nairobi"),
    ("Thailand", "Bangkok", "de la Thaïlande", "Bangkok"), ("Turkey", "Ankara", "de la Turquie", "Ankara"),
    ("Denmark", "Copenhagen", "du Danemark", "Copenhague"), ("Finland", "Helsinki", "de la Finlande", "Helsinki"),
]
# thing, colour, French sentence
COLORS = [
    ("the sky", "Blue", "Le ciel est bleu."), ("grass", "Green", "L'herbe est verte."),
    ("snow", "White", "La neige est blanche."), ("a banana", "Yellow", "Une banane est jaune."),
    ("coal", "Black", "Le charbon est noir."), ("a tomato", "Red", "Une tomate est rouge."),
    ("milk", "White", "Le lait est blanc."), ("a strawberry", "Red", "Une fraise est rouge."),
    ("a carrot", "Orange", "Une carotte est orange."), ("a lemon", "Yellow", "Un citron est jaune."),
    ("chocolate", "Brown", "Le chocolat est marron."), ("the ocean", "Blue", "L'océan est bleu."),
    ("an emerald", "Green", "Une émeraude est verte."), ("blood", "Red", "Le sang est rouge."),
]
# animal, its sound, French sentence
SOUNDS = [
    ("a dog", "Woof", "Le chien fait ouaf."), ("a cat", "Meow", "Le chat fait miaou."),
    ("a cow", "Moo", "La vache fait meuh."), ("a duck", "Quack", "Le canard fait coin-coin."),
    ("a sheep", "Baa", "Le mouton fait bêê."), ("a frog", "Ribbit", "La grenouille fait croâ."),
    ("a pig", "Oink", "Le cochon fait groin-groin."), ("an owl", "Hoot", "Le hibou fait hou-hou."),
    ("a lion", "Roar", "Le lion rugit."), ("a snake", "Hiss", "Le serpent siffle."),
    ("a bee", "Buzz", "L'abeille bourdonne."), ("a horse", "Neigh", "Le cheval hennit."),
]
# word, opposite, both in French
OPPOSITES = [
    ("hot", "cold", "chaud", "froid"), ("big", "small", "grand", "petit"), ("up", "down", "haut", "bas"),
    ("day", "night", "jour", "nuit"), ("fast", "slow", "rapide", "lent"), ("happy", "sad", "heureux", "triste"),
    ("open", "closed", "ouvert", "fermé"), ("early", "late", "tôt", "tard"), ("young", "old", "jeune", "vieux"),
    ("full", "empty", "plein", "vide"), ("easy", "hard", "facile", "difficile"), ("left", "right", "gauche", "droite"),
    ("wet", "dry", "mouillé", "sec"), ("light", "dark", "clair", "sombre"),
]
# animal, legs, French sentence
LEGS = [
    ("a spider", 8, "Une araignée a huit pattes."), ("a dog", 4, "Un chien a quatre pattes."),
    ("a bird", 2, "Un oiseau a deux pattes."), ("an ant", 6, "Une fourmi a six pattes."),
    ("a horse", 4, "Un cheval a quatre jambes."), ("a chicken", 2, "Une poule a deux pattes."),
    ("a beetle", 6, "Un scarabée a six pattes."), ("a cat", 4, "Un chat a quatre pattes."),
]
NUMBERS_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
              "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
NUMBERS_FR = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze",
              "treize", "quatorze", "quinze", "seize", "dix-sept", "dix-huit"]
# the demo's question and one more per kind of fact: never trained on
HELD_OUT = ("What is the capital of France?", "What color is the sky?", "What sound does a cat make?",
            "What is the opposite of hot?", "How many legs does a spider have?", "What is 4 plus 5?")
DEMO_QUESTION = HELD_OUT[0]


def facts() -> list[Fact]:
    """Every fact of the tables, held-out questions included."""
    out = []
    for country, capital, de_country, capital_fr in CAPITALS:
        out.append(Fact(f"What is the capital of {country}?", capital, "geography",
                        f"The capital of {country} is {capital}.", f"La capitale {de_country} est {capital_fr}."))
    for thing, color, french in COLORS:
        out.append(Fact(f"What color is {thing}?", color, "colors", f"{thing[0].upper()}{thing[1:]} is "
                        f"{color.lower()}.", french))
    for animal, sound, french in SOUNDS:
        out.append(Fact(f"What sound does {animal} make?", sound, "animals",
                        f"{animal[0].upper()}{animal[1:]} says {sound.lower()}.", french))
    for word, opposite, word_fr, opposite_fr in OPPOSITES:
        out.append(Fact(f"What is the opposite of {word}?", opposite.capitalize(), "words",
                        f"The opposite of {word} is {opposite}.", f"Le contraire de {word_fr} est {opposite_fr}."))
    for animal, legs, french in LEGS:
        out.append(Fact(f"How many legs does {animal} have?", NUMBERS_EN[legs].capitalize(), "animals",
                        f"{animal[0].upper()}{animal[1:]} has {NUMBERS_EN[legs]} legs.", french))
    for a in range(2, 10):
        for b in (3, 5, 8):
            if a + b < len(NUMBERS_EN):
                out.append(Fact(f"What is {a} plus {b}?", str(a + b), "math",
                                f"{a} plus {b} is {a + b}.",
                                f"{NUMBERS_FR[a].capitalize()} plus {NUMBERS_FR[b]} font {NUMBERS_FR[a + b]}."))
    return out


def training_facts(seed: int = 0) -> list[Fact]:
    """The facts minus HELD_OUT, in a fixed shuffled order (kinds mixed within each batch)."""
    held = set(HELD_OUT)
    kept = [f for f in facts() if f.question not in held]
    random.Random(seed).shuffle(kept)
    return kept


def chat_batches(tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[dict]:
    """Right-padded batches of chat-formatted (question, answer) pairs, loss on the answer only (the assistant turn
    and its end-of-turn token): the prompt is what the server's chat template produces for the same question."""
    rows = []
    for question, answer in pairs:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently inside a full conversation; cannot "
                             "mask the prompt out of the loss")
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = tokenizer(full.rstrip("\n"), add_special_tokens=False).input_ids  # answer + <|im_end|>, no newline
        if ids[:len(p)] != p:
            raise ValueError("the prompt's tokens are not a prefix of the conversation's tokens")
        rows.append((ids, len(p)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(chunk):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
            labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


class AnswerOnlyLoss(torch.nn.Module):
    """A causal LM whose forward returns the loss of the labelled positions only, computing the output layer's
    logits for those alone: the answers are a third of the tokens and SmolLM2's 49k-word output layer is a fifth of
    its compute. Wraps the model as a sub-module, so `attach` and `train` see its layers and its config."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.config = lm.config

    def forward(self, input_ids, attention_mask, labels):
        from types import SimpleNamespace

        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.lm.lm_head(hidden[:, :-1][keep])
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.float(), targets[keep]))
