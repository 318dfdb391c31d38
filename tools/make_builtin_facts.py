"""Generate t2edit/data/builtin_facts.json: a small world of fictional facts in KnowEdit WikiData_counterfact format.

    python tools/make_builtin_facts.py            # rewrites the shipped file (deterministic: same bytes each run)
    python tools/make_builtin_facts.py --check    # exit 1 if the shipped file differs from what this script makes

The world: invented countries, towns, people, companies and rivers, linked by a few relations. Every subject is
edited at most once (one record), so the other facts about it can serve as its locality probes. Each record's
target_new is an answer the world already gives to some OTHER fact (a real LLM knows "Peter Arno" before anyone
edits a spouse to it), and two-hop Reasoning probes only go through facts no record edits, so their expected
answers do not depend on which other records are edited in the same batch.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "t2edit" / "data" / "builtin_facts.json"
SEED = 20261125

# relation -> (subject kind, prompt template, answer kind)
RELATIONS = {
    "spouse": ("person", "The spouse of {} is", "person"),
    "citizenship": ("person", "The country of citizenship of {} is", "country"),
    "occupation": ("person", "The occupation of {} is", "occupation"),
    "birthplace": ("person", "The place of birth of {} is", "town"),
    "employer": ("person", "The employer of {} is", "company"),
    "capital": ("country", "The capital of {} is", "town"),
    "language": ("country", "The official language of {} is", "language"),
    "currency": ("country", "The currency of {} is", "currency"),
    "head_of_state": ("country", "The head of state of {} is", "person"),
    "located_in": ("town", "The country in which {} is located is", "country"),
    "river": ("town", "The river that flows through {} is", "river"),
    "founder": ("company", "{} was founded by", "person"),
    "headquarters": ("company", "The headquarters of {} is located in", "town"),
    "industry": ("company", "The industry of {} is", "industry"),
    "mouth": ("river", "The {} flows into the", "sea"),
    "river_country": ("river", "The {} flows through the country of", "country"),
}

# edited relation -> (relation of the target that the second hop reads, two-hop prompt template)
TWO_HOP = {
    "citizenship": ("capital", "The capital of the country of citizenship of {} is"),
    "spouse": ("occupation", "The occupation of the spouse of {} is"),
    "birthplace": ("located_in", "The country in which the place of birth of {} is located is"),
    "employer": ("headquarters", "The headquarters of the employer of {} is located in"),
    "founder": ("citizenship", "The country of citizenship of the founder of {} is"),
    "head_of_state": ("occupation", "The occupation of the head of state of {} is"),
    "located_in": ("capital", "The capital of the country in which {} is located is"),
    "headquarters": ("located_in", "The country in which the headquarters of {} is located is"),
    "river_country": ("capital", "The capital of the country the {} flows through is"),
}

# Relations read by two-hop probes: never edited, and listed first among a subject's locality probes so the
# world teaches them.
SECOND_HOP_RELATIONS = ["capital", "occupation", "located_in", "headquarters", "citizenship"]

COUNTRIES = ["Veloria", "Kastrenia", "Ordovia", "Maravel", "Quorland", "Brenmark", "Ishtaval", "Lunesse",
             "Zarkhan", "Pellandia", "Ostmere", "Dravonia"]
LANGUAGES = ["Velorian", "Kastrenian", "Ordovic", "Maravese", "Quorish", "Brennish", "Ishtavi", "Lunessan",
             "Zarkhani", "Pellandic", "Ostmeric", "Dravonian"]
CURRENCY_UNITS = ["crown", "mark", "florin", "real", "pound", "krone", "dinar", "franc", "thaler", "guilder",
                  "shilling", "ducat"]
COUNTRY_FORMS = ["the Republic of {}", "the Kingdom of {}", "the Federation of {}", "the Grand Duchy of {}"]
TOWN_PREFIXES = ["Alder", "Bram", "Cold", "Dun", "Elm", "Fern", "Gale", "Hollow", "Iron", "Kes", "Lark", "Mill",
                 "Oak", "Pike", "Quill", "Raven", "Salt", "Thorn", "Umber", "Vale", "Wren", "Yew", "Ash", "Brisk"]
TOWN_SUFFIXES = ["ford", "mouth", "wick", "haven", "stead", "moor", "bury", "gate", "holm", "ley"]
FIRST_NAMES = ["Ilse", "Tomas", "Marta", "Jorun", "Edvin", "Sanne", "Oskar", "Lenka", "Pavel", "Runa", "Anselm",
               "Brigida", "Cyrus", "Dagny", "Emeric", "Fenna", "Gideon", "Halla", "Ivo", "Jessamy", "Kasimir",
               "Liesel", "Nils", "Orla", "Piet", "Quintus", "Rosalind", "Sabeth", "Teodor", "Ulla", "Vesna",
               "Wendel"]
# Surnames are made of two syllables, each used by one person only: a subject is then told apart from another
# by its surname, as real names mostly are (a toy world where half the people shared a surname would make
# "is this fact about the same person?" much harder than it is for a real LLM).
SURNAME_HEADS = ["Ar", "Bel", "Cor", "Dal", "Ev", "Fal", "Gor", "Hal", "Isk", "Jor", "Kel", "Lor", "Mor", "Nor",
                 "Ost", "Pel", "Quar", "Ras", "Sel", "Tor", "Ulv", "Var", "Wes", "Zel"]
SURNAME_TAILS = ["holt", "stad", "wick", "mere", "dane", "berg", "vik", "mont", "ard", "sen"]
COMPANY_NAMES = ["Arnholt", "Brekke", "Castellane", "Drosdov", "Eskeland", "Falkner", "Grisholm", "Harrowgate",
              "Istvanek", "Jormunsen", "Kettleby", "Lindqvar", "Mortensby", "Norcross", "Pellworth", "Quarrington",
              "Rasmark", "Sundqvar", "Tillemann", "Ulverstane", "Vantongren", "Whitlock", "Yarrowby", "Zelenko"]
MIDDLE_INITIALS = ["A.", "B.", "C.", "D.", "E.", "J.", "K.", "L.", "M.", "R.", "S.", "T."]
OCCUPATIONS = ["painter", "marine biologist", "jazz pianist", "architect", "novelist", "cartographer",
               "glassblower", "astronomer", "civil engineer", "botanist", "sculptor", "diplomat", "watchmaker",
               "chess player"]
COMPANY_KINDS = [("Shipworks", "shipbuilding"), ("Textiles", "textiles"), ("Mining Company", "mining"),
                 ("Press", "publishing"), ("Brewery", "brewing"), ("Software", "software"),
                 ("Aviation", "aviation")]
RIVERS = ["Orvin", "Selk", "Tamber", "Ausk", "Merrow", "Vessa", "Dunmer", "Kell", "Yslow", "Brannoc", "Corrin",
          "Estal"]
SEAS = ["Amber Sea", "Grey Gulf", "Sea of Tarn", "Pale Ocean", "Lake Venn"]

N_PEOPLE, N_COUPLES, N_COMPANIES = 56, 21, 14
TOWNS_PER_COUNTRY, TOWN_RECORDS = 3, 24
MAX_RELATION_SPECIFICITY = 2
ALIAS_SHARE, FORGETFULNESS_SHARE = 0.85, 0.3


class World:
    """Entities (name, kind, alias) and their facts: facts[(subject, relation)] = answer."""

    def __init__(self):
        self.kind: dict[str, str] = {}
        self.alias: dict[str, str] = {}
        self.facts: dict[tuple[str, str], str] = {}

    def add(self, name: str, kind: str, alias: str):
        assert name not in self.kind and alias not in self.kind, name
        self.kind[name], self.alias[name] = kind, alias

    def relations_of(self, subject: str) -> list[str]:
        return [rel for rel in RELATIONS if (subject, rel) in self.facts]


def make_world(rng: random.Random) -> World:
    world = World()
    towns_pool = [p + s for p in TOWN_PREFIXES for s in TOWN_SUFFIXES]
    rng.shuffle(towns_pool)
    towns = [f"Port {t}" if i % 7 == 3 else t for i, t in enumerate(towns_pool[: len(COUNTRIES) * TOWNS_PER_COUNTRY])]
    for country, language, unit in zip(COUNTRIES, LANGUAGES, rng.sample(CURRENCY_UNITS, len(CURRENCY_UNITS))):
        world.add(country, "country", rng.choice(COUNTRY_FORMS).format(country))
        world.facts[country, "language"] = language
        world.facts[country, "currency"] = f"{language} {unit}"
    for i, town in enumerate(towns):
        country = COUNTRIES[i % len(COUNTRIES)]
        world.add(town, "town", f"the city of {town}")
        world.facts[town, "located_in"] = country
        if i < len(COUNTRIES):  # the first town of each country is its capital
            world.facts[country, "capital"] = town
    for i, river in enumerate(RIVERS):
        name = f"{river} River"
        world.add(name, "river", f"River {river}")
        world.facts[name, "mouth"] = rng.choice(SEAS)
        world.facts[name, "river_country"] = COUNTRIES[i]
        for town in towns:  # a country's river flows through its towns
            if world.facts[town, "located_in"] == COUNTRIES[i]:
                world.facts[town, "river"] = name

    surnames = rng.sample([h + t for h in SURNAME_HEADS for t in SURNAME_TAILS], N_PEOPLE)
    names = [(rng.choice(FIRST_NAMES), surname) for surname in surnames]
    people = []
    for i, (first, last) in enumerate(names):
        middle = MIDDLE_INITIALS[i % len(MIDDLE_INITIALS)]
        # KnowEdit-like aliases: "Emily I Jones" <-> "Emily Jones"; half the subjects carry the middle initial.
        full, short = f"{first} {middle} {last}", f"{first} {last}"
        name, alias = (full, short) if i % 2 else (short, full)
        world.add(name, "person", alias)
        people.append(name)
        country = rng.choice(COUNTRIES)
        world.facts[name, "citizenship"] = country
        world.facts[name, "occupation"] = rng.choice(OCCUPATIONS)
        home_towns = [t for t in towns if world.facts[t, "located_in"] == country]
        world.facts[name, "birthplace"] = rng.choice(home_towns if rng.random() < 0.7 else towns)
    for a, b in zip(people[: N_COUPLES], people[N_COUPLES: 2 * N_COUPLES]):
        world.facts[a, "spouse"], world.facts[b, "spouse"] = b, a
    for country, person in zip(COUNTRIES, rng.sample(people, len(COUNTRIES))):
        world.facts[country, "head_of_state"] = person

    used_last = set()
    companies = []
    for i in range(N_COMPANIES):
        kind, industry = COMPANY_KINDS[i % len(COMPANY_KINDS)]
        last = rng.choice([n for n in COMPANY_NAMES if n not in used_last])
        used_last.add(last)
        name = f"{last} {kind}"
        world.add(name, "company", f"{name} Ltd")
        companies.append(name)
        world.facts[name, "founder"] = rng.choice(people)
        world.facts[name, "headquarters"] = rng.choice(towns)
        world.facts[name, "industry"] = industry
    for person in people:
        world.facts[person, "employer"] = rng.choice(companies)
    return world


def choose_edits(world: World, rng: random.Random) -> list[tuple[str, str]]:
    """(subject, relation) of each record: every subject once at most; second-hop relations never edited."""
    people = [n for n, k in world.kind.items() if k == "person"]
    married = [p for p in people if (p, "spouse") in world.facts]
    single = [p for p in people if p not in married]
    rng.shuffle(married)
    edits = [(p, "spouse") for p in married[:14]]
    rest = married[14:] + single
    rng.shuffle(rest)
    plan = ["citizenship"] * 10 + ["occupation"] * 8 + ["birthplace"] * 12 + ["employer"] * 12
    for person, relation in zip(rest, plan):
        edits.append((person, relation))
    countries = [n for n, k in world.kind.items() if k == "country"]
    for country, relation in zip(countries, ["language"] * 5 + ["currency"] * 4 + ["head_of_state"] * 3):
        edits.append((country, relation))
    towns = [n for n, k in world.kind.items() if k == "town"]
    for town in rng.sample(towns, TOWN_RECORDS):
        has_river = (town, "river") in world.facts
        edits.append((town, "river" if has_river and rng.random() < 0.5 else "located_in"))
    companies = [n for n, k in world.kind.items() if k == "company"]
    for i, company in enumerate(companies):
        edits.append((company, "founder" if i % 2 == 0 else "headquarters"))
    rivers = [n for n, k in world.kind.items() if k == "river"]
    for i, river in enumerate(rivers):
        edits.append((river, "mouth" if i % 2 == 0 else "river_country"))
    return edits


def prompt_of(relation: str, subject: str) -> str:
    return RELATIONS[relation][1].format(subject)


def forgetfulness_prompt(prompt: str, target: str) -> str | None:
    """KnowEdit's form: "The occupation of X, which is not philatelist, is"."""
    return prompt[: -len(" is")] + f", which is not {target}, is" if prompt.endswith(" is") else None


def make_records(world: World, rng: random.Random) -> list[dict]:
    edits = choose_edits(world, rng)
    edited = set(edits)
    # Locality first (it decides which facts the world knows), then targets chosen among known answers.
    locality: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (subject, edited relation) -> [(prompt, answer)]
    taught: dict[tuple[str, str], str] = {}  # (subject, relation) -> answer, for every fact the world teaches
    for subject, relation in edits:
        others = [r for r in world.relations_of(subject) if r != relation]
        first = [r for r in SECOND_HOP_RELATIONS if r in others]
        later = [r for r in others if r not in first]
        rng.shuffle(later)
        chosen = [relation] + (first + later)[:MAX_RELATION_SPECIFICITY]
        taught.update({(subject, r): world.facts[subject, r] for r in chosen})
        locality[subject, relation] = [(prompt_of(r, subject), world.facts[subject, r]) for r in chosen[1:]]
    answered_by = defaultdict(set)  # answer -> prompts the world answers with it
    for (subject, relation), answer in taught.items():
        answered_by[answer].add(prompt_of(relation, subject))

    records = []
    for subject, relation in edits:
        prompt, answer_kind = prompt_of(relation, subject), RELATIONS[relation][2]
        old = world.facts[subject, relation]
        candidates = sorted(a for a, prompts in answered_by.items()
                            if a != old and a != subject and kind_of(world, a) == answer_kind
                            and prompts - {prompt})
        two_hop = TWO_HOP.get(relation)
        if two_hop:  # prefer targets whose second-hop fact the world knows and no record edits
            known = [t for t in candidates if (t, two_hop[0]) in taught and (t, two_hop[0]) not in edited]
            candidates = known or candidates
        target = rng.choice(candidates)
        record = {"subject": subject, "prompt": prompt, "target_new": target, "ground_truth": old,
                  "portability": {}, "locality": {}}
        if two_hop and (target, two_hop[0]) in taught and (target, two_hop[0]) not in edited:
            record["portability"]["Reasoning"] = [
                {"prompt": two_hop[1].format(subject), "ground_truth": taught[target, two_hop[0]]}]
        if rng.random() < ALIAS_SHARE:
            record["portability"]["Subject_Aliasing"] = [
                {"prompt": prompt_of(relation, world.alias[subject]), "ground_truth": target}]
        if locality[subject, relation]:
            record["locality"]["Relation_Specificity"] = [
                {"prompt": p, "ground_truth": a} for p, a in locality[subject, relation]]
        forget = forgetfulness_prompt(prompt, target)
        if forget and rng.random() < FORGETFULNESS_SHARE:
            record["locality"]["Forgetfulness"] = [{"prompt": forget, "ground_truth": old}]
        records.append(record)
    return records


_VALUE_KINDS = {**{v: "language" for v in LANGUAGES}, **{v: "occupation" for v in OCCUPATIONS},
                **{v: "sea" for v in SEAS}, **{v: "industry" for _, v in COMPANY_KINDS}}


def kind_of(world: World, answer: str) -> str:
    if answer in world.kind:
        return world.kind[answer]
    if answer in _VALUE_KINDS:
        return _VALUE_KINDS[answer]
    if answer.split(" ")[0] in LANGUAGES:
        return "currency"
    raise AssertionError(f"unknown answer kind: {answer}")


def check(records: list[dict]):
    """The properties the world builder and the tests rely on."""
    answers = defaultdict(set)  # answer -> prompts answering it
    for r in records:
        answers[r["ground_truth"]].add(r["prompt"])
        for probes in r["locality"].values():
            for p in probes:
                answers[p["ground_truth"]].add(p["prompt"])
    for r in records:
        assert answers[r["target_new"]] - {r["prompt"]}, f"target of {r['prompt']!r} is not a known answer"
        assert r["target_new"] != r["ground_truth"], r
    prompts = [r["prompt"] for r in records]
    assert len(prompts) == len(set(prompts)), "duplicate edit prompts"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare with the shipped file")
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    records = make_records(make_world(rng), rng)
    check(records)
    text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    if args.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: {'up to date' if same else 'DIFFERS from the generator output'}")
        return 0 if same else 1
    temp = OUT.with_name(f".{OUT.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, OUT)
    n_alias = sum("Subject_Aliasing" in r["portability"] for r in records)
    n_two_hop = sum("Reasoning" in r["portability"] for r in records)
    print(f"wrote {OUT}: {len(records)} records, {n_alias} with aliases, {n_two_hop} with two-hop reasoning, "
          f"{len(text) / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
