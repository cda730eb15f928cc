"""Generated sentences with named entities: the data of the demo NER model (token classification).

Sentences come from templates filled with people, places and organisations from lists. The training set and
the held-out set use disjoint lists of names, so the held-out check measures how the model finds entities
it has never seen, from their context and form.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TRAIN_NAMES = {
    "PER": [
        "John Smith",
        "Maria Garcia",
        "Wei Zhang",
        "Fatima Khan",
        "Olivia Brown",
        "Lucas Martin",
        "Yuki Tanaka",
        "Ahmed Hassan",
        "Sofia Rossi",
        "David Cohen",
        "Emma Wilson",
        "Noah Johnson",
        "Chloe Dubois",
        "Ivan Petrov",
        "Aisha Bello",
        "Carlos Mendes",
        "Hannah Schmidt",
        "Raj Patel",
        "Laura Jensen",
        "Tom Becker",
        "Anna Kowalski",
        "Peter",
        "Sarah",
        "Michael",
        "Elena",
        "Kenji",
        "Grace Lee",
        "Omar Farouk",
        "Julia Novak",
        "Samuel Okafor",
    ],
    "LOC": [
        "Paris",
        "Berlin",
        "Tokyo",
        "Nairobi",
        "Lima",
        "Toronto",
        "Madrid",
        "Cairo",
        "Sydney",
        "Oslo",
        "Chicago",
        "Mumbai",
        "Rome",
        "Seoul",
        "Lisbon",
        "Brazil",
        "Canada",
        "Kenya",
        "Norway",
        "India",
        "New York",
        "San Francisco",
        "Buenos Aires",
        "Cape Town",
        "Mexico City",
        "Vienna",
        "Dublin",
        "Lagos",
    ],
    "ORG": [
        "Acme Corp",
        "Globex",
        "Initech",
        "Umbrella Labs",
        "Stark Industries",
        "Wayne Enterprises",
        "Hooli",
        "Vandelay Industries",
        "Cyberdyne Systems",
        "Soylent Foods",
        "Tyrell Corporation",
        "Wonka Industries",
        "Northwind Traders",
        "Contoso",
        "Fabrikam",
        "the United Nations",
        "the World Bank",
        "Red Cross",
        "Oxford University",
        "Blue Harbor Bank",
        "Pied Piper",
        "Aperture Science",
        "Massive Dynamic",
    ],
}

HELD_OUT_NAMES = {
    "PER": [
        "Alice Martin",
        "Brian O'Neill",
        "Catalina Ruiz",
        "Dmitri Volkov",
        "Esther Mwangi",
        "Farid Nasser",
        "Greta Lindqvist",
        "Hiroshi Sato",
        "Isabel Ferreira",
        "Jonas Weber",
        "Kwame Mensah",
        "Leila Haddad",
        "Marco Bianchi",
        "Nadia Popescu",
        "Oscar Nilsson",
        "Priya Sharma",
    ],
    "LOC": [
        "Geneva",
        "Montreal",
        "Kyoto",
        "Accra",
        "Bogota",
        "Helsinki",
        "Athens",
        "Hanoi",
        "Prague",
        "Denver",
        "Portugal",
        "Chile",
        "Warsaw",
        "Edinburgh",
    ],
    "ORG": [
        "Zenith Motors",
        "Orbital Dynamics",
        "Maple Leaf Insurance",
        "Sunrise Bakery",
        "Quantum Ledger",
        "Silverline Airways",
        "Greenfield Energy",
        "Atlas Logistics",
        "Harbor Health",
        "Polaris Media",
    ],
}

TEMPLATES = [
    "{PER} works for {ORG} in {LOC}.",
    "{PER} flew from {LOC} to {LOC} last week.",
    "Yesterday {PER} met {PER} at the {ORG} office.",
    "{ORG} opened a new branch in {LOC}.",
    "The CEO of {ORG}, {PER}, spoke in {LOC} on Monday.",
    "I think {PER} moved to {LOC} after college.",
    "{ORG} hired {PER} as its new director.",
    "According to {PER}, {ORG} will expand to {LOC}.",
    "{PER} and {PER} visited {LOC} in the spring.",
    "Shares of {ORG} rose after the report from {LOC}.",
    "Please send the invoice to {PER} at {ORG}.",
    "{LOC} is where {PER} grew up.",
    "The team from {ORG} arrived in {LOC} late.",
    "Call {PER} before you leave for {LOC}.",
    "Our meeting with {ORG} was moved to Thursday.",
    "{PER} said the weather in {LOC} was lovely.",
    "She signed a contract with {ORG} last year.",
    "The conference in {LOC} was organised by {ORG}.",
    "We had lunch and then went home early.",
    "Nothing happened at the office today.",
]

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


@dataclass(frozen=True)
class Sentence:
    text: str
    entities: tuple[tuple[str, int, int], ...]  # (type, start, end), end exclusive


def fill(template: str, names: dict[str, list[str]], rng: random.Random) -> Sentence:
    """A template with each slot filled by a random name of its type; the entities' spans in the text."""
    text, entities, rest = "", [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        kind, _, rest = after.partition("}")
        text += before
        name = rng.choice(names[kind])
        entities.append((kind, len(text), len(text) + len(name)))
        text += name
    return Sentence(text + rest, tuple(entities))


def sentences(n: int, names: dict[str, list[str]], seed: int) -> list[Sentence]:
    rng = random.Random(seed)
    return [fill(rng.choice(TEMPLATES), names, rng) for _ in range(n)]


def entity_f1(gold: list[Sentence], predicted: list[list[dict]]) -> float:
    """Entity-level F1: an entity counts when its type and span match exactly (spans as the pipeline gives
    them, ``start`` and ``end`` in the text)."""
    want = {(i, *e) for i, s in enumerate(gold) for e in s.entities}
    got = {(i, p["entity_group"], p["start"], p["end"]) for i, row in enumerate(predicted) for p in row}
    hits = len(want & got)
    precision = hits / len(got) if got else 0.0
    recall = hits / len(want) if want else 1.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
