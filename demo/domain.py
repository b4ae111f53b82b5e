"""The downstream domain: terse bulletins (weather, match results, train departures), nothing like the
pretraining prose. Three data owners get a non-IID split: each mostly holds one kind of bulletin."""
from __future__ import annotations

import json
import random
from pathlib import Path

from offsite.files import atomic_write

CITIES = ["Aldport", "Brenham", "Calder", "Dunmore", "Elswick", "Fairhaven", "Glenrock", "Harrow",
          "Ivybridge", "Jarrow", "Kelso", "Lydford", "Morley", "Newbury", "Oakham", "Penrith"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WINDS = ["north", "south", "east", "west", "northeast", "southwest"]
CONDITIONS = {"sunny": (18, 30), "cloudy": (10, 20), "light rain": (6, 15), "snow": (-8, 2), "fog": (2, 10)}
TEAMS = ["Rovers", "United", "Athletic", "City", "Wanderers", "Albion", "Rangers", "Town"]
PLAYERS = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Byrne", "Kowalski"]
STATUS = ["on time", "delayed 5 min", "delayed 12 min", "cancelled", "on time"]
KINDS = ("weather", "match", "train")


def weather(r: random.Random) -> str:
    cond = r.choice(list(CONDITIONS))
    lo, hi = CONDITIONS[cond]
    low = r.randint(lo, hi - 4)
    return (f"WEATHER {r.choice(CITIES)}, {r.choice(DAYS)}: {cond}, high {low + r.randint(3, 8)} C, "
            f"low {low} C, wind {r.choice(WINDS)} {r.randint(5, 40)} km/h.")


def match(r: random.Random) -> str:
    home, away = r.sample([f"{c} {t}" for c, t in zip(r.sample(CITIES, 8), TEAMS)], 2)
    hs, as_ = r.randint(0, 4), r.randint(0, 4)
    result = "home win" if hs > as_ else "away win" if as_ > hs else "draw"
    scorer = f" Scorer: {r.choice(PLAYERS)} {r.randint(1, 90)}'." if hs + as_ else ""
    return f"MATCH {r.choice(DAYS)}: {home} {hs}-{as_} {away} ({result}).{scorer}"


def train_departure(r: random.Random) -> str:
    a, b = r.sample(CITIES, 2)
    return (f"TRAIN {a} to {b}: departs {r.randint(5, 23):02d}:{r.choice(range(0, 60, 5)):02d} "
            f"from platform {r.randint(1, 9)}, {r.choice(STATUS)}.")


MAKERS = {"weather": weather, "match": match, "train": train_departure}


def client_mix(client: int, n_clients: int, main_share: float) -> dict[str, float]:
    """Client k mostly holds kind k % 3; the rest is spread over the other kinds."""
    main = KINDS[client % len(KINDS)]
    rest = (1 - main_share) / (len(KINDS) - 1)
    return {k: main_share if k == main else rest for k in KINDS}


def make_client_records(client: int, n_clients: int, n: int, main_share: float, seed: int) -> list[str]:
    r = random.Random(f"{seed}-{client}")
    mix = client_mix(client, n_clients, main_share)
    kinds = r.choices(list(mix), weights=list(mix.values()), k=n)
    return [MAKERS[k](r) for k in kinds]


def write_jsonl(path: Path, texts: list[str]) -> None:
    atomic_write(path, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())


RESULT_AT = " ("  # a match bulletin's result follows its score: "... 3-1 Calder City (home win). ..."


def match_results(texts: list[str]) -> list[tuple[str, str]]:
    """(prompt, completion) for every match bulletin: the bulletin up to its result, and the result that its
    score determines, as " (home win)". The prompt ends before a space, where the tokenizer splits anyway."""
    out = []
    for text in texts:
        if text.startswith("MATCH "):
            prompt, rest = text.split(RESULT_AT, 1)
            out.append((prompt, RESULT_AT + rest.split(")", 1)[0] + ")"))
    return out


def write_clients(out: Path, n_clients: int = 3, n_train: int = 1500, n_heldout: int = 200,
                  main_share: float = 0.8, seed: int = 0) -> list[Path]:
    """One folder per client with train.jsonl, heldout.jsonl and, where its held-out records have match
    bulletins, heldout_task.jsonl (their results as prompt and completion, for exact match); returns the folders."""
    folders = []
    for c in range(n_clients):
        records = make_client_records(c, n_clients, n_train + n_heldout, main_share, seed)
        folder = out / f"client-{c + 1}"
        write_jsonl(folder / "train.jsonl", records[:n_train])
        write_jsonl(folder / "heldout.jsonl", records[n_train:])
        tasks = match_results(records[n_train:])
        if tasks:  # a tiny held-out set may hold no match bulletin: then no task set (an empty one is no data)
            atomic_write(folder / "heldout_task.jsonl",
                         "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in tasks).encode())
        folders.append(folder)
    return folders
