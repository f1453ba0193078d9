"""A built-in dialogue-summarization task that needs no data directory.

Short two-person dialogues in DialogSum's style (``#Person1#: ...`` lines) about everyday scenarios: booking a
table, buying an item, asking the way, scheduling a meeting, returning a product. Each dialogue is a few turns
picked from paraphrase variants, with slots (names, items, times, places, quantities) from small vocabularies;
its summary is determined by the slots, so a small model can learn to copy slots into a template. Each example
has two reference summaries (paraphrases). Example ``i`` depends only on ``(seed, i)``, so the output is
byte-identical for a seed, and the first ``k`` examples do not depend on ``n``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lmcycle.data.examples import Example
from lmcycle.data.templates import get_template

NAMES = ["Mr. Smith", "Ms. Brown", "Mr. Green", "Mrs. Lee", "Ms. Davis", "Mr. Wilson", "Mrs. Taylor", "Mr. Clark"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
DAYS = [*WEEKDAYS, "Saturday", "Sunday"]
EVENING_TIMES = ["6 pm", "7 pm", "7:30 pm", "8 pm", "8:30 pm"]
OFFICE_TIMES = ["9 am", "10 am", "11 am", "2 pm", "3 pm", "4 pm"]
COUNTS = ["two", "three", "four", "five", "six"]
RESTAURANTS = ["the Golden Dragon", "the Blue Fish", "the Corner Cafe", "the Green Garden", "the Old Mill"]
ITEMS = [("shirt", "shirts"), ("jacket", "jackets"), ("hat", "hats"), ("scarf", "scarves"), ("bag", "bags"),
         ("mug", "mugs"), ("notebook", "notebooks")]
COLORS = ["red", "blue", "black", "white", "green", "brown"]
PRICES = ["10", "15", "20", "25", "30", "40", "50"]
PLACES = ["train station", "museum", "post office", "city library", "city park", "hospital", "cinema"]
STREETS = ["Main Street", "Park Road", "King Street", "River Lane", "Oak Avenue"]
LANDMARKS = ["traffic lights", "supermarket", "church", "bus stop", "bakery"]
MINUTES = ["five", "ten", "fifteen", "twenty"]
BUSES = ["5", "12", "21", "30", "42"]
MEETING_TOPICS = ["budget", "new project", "sales report", "marketing plan", "team schedule", "hiring plan"]
ROOMS = ["room 101", "room 204", "room 315", "the meeting room", "the cafeteria", "the library"]
DEVICES = ["toaster", "kettle", "lamp", "phone", "watch", "radio"]
WHEN = ["yesterday", "last week", "two days ago", "on Saturday"]
FAULTS = ["is broken", "does not work", "has a scratch", "makes a strange noise"]

Scenario = Callable[[random.Random], tuple[list[str], list[str], dict[str, str]]]


def synthetic_dialogues(n: int, seed: int) -> list[Example]:
    """``n`` dialogues with two reference summaries each (task ``dialogue_summary``), deterministic in ``seed``.

    ``meta`` holds the scenario kind and its slots.
    """
    examples = []
    for i in range(n):
        # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and Python versions.
        rng = random.Random(f"lmcycle-synthetic:{seed}:{i}")
        kind = rng.choice(sorted(SCENARIOS))
        turns, summaries, slots = SCENARIOS[kind](rng)
        dialogue = "\n".join(f"#Person{1 + t % 2}#: {_capitalize(turn)}" for t, turn in enumerate(turns))
        examples.append(Example(input=dialogue, targets=summaries, task="dialogue_summary",
                                id=f"synthetic-{seed}-{i}", meta={"scenario": kind, "slots": slots}))
    return examples


def synthetic_preferences(n: int, seed: int, template: str = "summarize") -> list[Example]:
    """Preference pairs on the first ``n`` built-in dialogues, as recipe examples (see
    :func:`lmcycle.data.preferences.examples_from_pairs`).

    The prompt is the dialogue rendered with ``template`` (as the SFT and PPO stages render it); chosen is its own
    summary, rejected the summary of another dialogue: for half the pairs one of another scenario (the wrong
    topic), for the other half one of the same scenario (the right template with the wrong names, times or
    places, so a reward model must read the dialogue to tell them apart).
    """
    dialogues = synthetic_dialogues(n, seed)
    render = get_template(template).render
    out = []
    for i, ex in enumerate(dialogues):
        rng = random.Random(f"lmcycle-synthetic-preference:{seed}:{i}")
        same_kind = rng.random() < 0.5
        others = [d for d in dialogues if (d.meta["scenario"] == ex.meta["scenario"]) == same_kind
                  and d.target != ex.target]
        rejected = rng.choice(others or [d for d in dialogues if d.target != ex.target]).target
        out.append(Example(input=render(ex, []), targets=[" " + ex.target], task="preference", id=ex.id,
                           meta={"rejected": " " + rejected, "margin": 1.0, "labeler": "synthetic"}))
    return out


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _say(rng: random.Random, variants: list[str], slots: dict[str, str]) -> str:
    return rng.choice(variants).format(**slots)


def book_table(rng: random.Random) -> tuple[list[str], list[str], dict[str, str]]:
    s = {"restaurant": rng.choice(RESTAURANTS), "people": rng.choice(COUNTS), "day": rng.choice(DAYS),
         "time": rng.choice(EVENING_TIMES), "name": rng.choice(NAMES), "window": rng.choice(["yes", "no"])}
    turns = [
        _say(rng, ["Hello, I'd like to book a table at {restaurant} for {people} on {day}.",
                   "Hi. Can I reserve a table at {restaurant} for {people} people on {day}?",
                   "Good evening. I want to make a reservation at {restaurant} for {people} on {day}."], s),
        _say(rng, ["Certainly. What time would you like?", "No problem. For what time?"], s),
        _say(rng, ["At {time}, please.", "{time} would be great."], s),
        _say(rng, ["Could I have your name, please?", "Whose name is the booking under?"], s),
        _say(rng, ["It's {name}.", "The name is {name}."], s),
    ]
    if s["window"] == "yes":
        turns += [_say(rng, ["Would you like a table by the window?", "Do you want to sit by the window?"], s),
                  _say(rng, ["Yes, that would be lovely.", "Yes, please."], s)]
    turns.append(_say(rng, ["Thank you, {name}. See you on {day}.", "All right, your table is booked."], s))
    window = " by the window" if s["window"] == "yes" else ""
    summaries = [
        f"#Person1# books a table for {s['people']} at {s['restaurant']} on {s['day']} at {s['time']}{window} "
        f"under the name {s['name']}.",
        f"#Person1# reserves a table{window} at {s['restaurant']} for {s['people']} people at {s['time']} on "
        f"{s['day']}. The booking is under {s['name']}.",
    ]
    return turns, summaries, s


def buy_item(rng: random.Random) -> tuple[list[str], list[str], dict[str, str]]:
    item, items = rng.choice(ITEMS)
    s = {"item": item, "items": items, "color": rng.choice(COLORS), "price": rng.choice(PRICES),
         "quantity": rng.choice(COUNTS), "payment": rng.choice(["", "card", "cash"])}
    turns = [
        _say(rng, ["Excuse me, do you sell {items}?", "Hi, have you got any {items}?",
                   "Hello, do you have any {items}?"], s),
        _say(rng, ["Yes, we do. What colour would you like?", "Sure. Which colour do you want?"], s),
        _say(rng, ["{color}, please.", "I'd like {color} ones."], s),
        _say(rng, ["Here you are. They are {price} dollars each.", "These {color} ones are {price} dollars each."], s),
        _say(rng, ["OK, I'll take {quantity}.", "Great, I'll buy {quantity} of them."], s),
    ]
    pay = ""
    if s["payment"]:
        turns += [_say(rng, ["How would you like to pay?", "Cash or card?"], s),
                  "By card, please." if s["payment"] == "card" else "In cash, please."]
        pay = " and pays by card" if s["payment"] == "card" else " and pays in cash"
    turns.append(_say(rng, ["Thank you. Have a nice day.", "Good choice. Enjoy them."], s))
    summaries = [
        f"#Person1# buys {s['quantity']} {s['color']} {items} for {s['price']} dollars each{pay}.",
        f"#Person2# sells #Person1# {s['quantity']} {s['color']} {items} at {s['price']} dollars each"
        f"{pay.replace(' and pays', ', paid')}.",
    ]
    return turns, summaries, s


def ask_way(rng: random.Random) -> tuple[list[str], list[str], dict[str, str]]:
    s = {"place": rng.choice(PLACES), "street": rng.choice(STREETS), "direction": rng.choice(["left", "right"]),
         "landmark": rng.choice(LANDMARKS), "minutes": rng.choice(MINUTES), "bus": rng.choice(["", *BUSES])}
    turns: list[str] = [
        _say(rng, ["Excuse me, could you tell me the way to the {place}?", "Excuse me, how do I get to the {place}?",
                   "Sorry to bother you, where is the {place}?"], s),
        _say(rng, ["Sure. Go straight along {street} and turn {direction} at the {landmark}.",
                   "Go down {street}, then turn {direction} at the {landmark}."], s),
        # The answer must fit the question, so the two turns are picked as a pair.
        *(t.format(**s) for t in rng.choice([("Is it far from here?", "Not really, it's about {minutes} minutes on foot."),
                                             ("How long does it take to walk there?", "It's about a {minutes}-minute walk.")])),
    ]
    if s["bus"]:
        turns += [_say(rng, ["Can I take a bus?", "Is there a bus?"], s),
                  _say(rng, ["Yes, the number {bus} bus goes there.", "Yes, take bus number {bus}."], s)]
    turns.append(_say(rng, ["Thank you very much.", "Thanks a lot."], s))
    if rng.random() < 0.5:
        turns.append(_say(rng, ["You're welcome.", "No problem. Enjoy your day."], s))
    bus_a = f", or #Person1# can take bus number {s['bus']}" if s["bus"] else ""
    bus_b = f" It can also be reached by bus number {s['bus']}." if s["bus"] else ""
    summaries = [
        f"#Person2# tells #Person1# the way to the {s['place']}: go along {s['street']} and turn {s['direction']} "
        f"at the {s['landmark']}. It is about {s['minutes']} minutes on foot{bus_a}.",
        f"#Person1# asks #Person2# how to get to the {s['place']}, which is {s['minutes']} minutes away along "
        f"{s['street']}, turning {s['direction']} at the {s['landmark']}.{bus_b}",
    ]
    return turns, summaries, s


def schedule_meeting(rng: random.Random) -> tuple[list[str], list[str], dict[str, str]]:
    busy, day = rng.sample(WEEKDAYS, 2)
    s = {"topic": rng.choice(MEETING_TOPICS), "busy_day": busy, "day": day, "time": rng.choice(OFFICE_TIMES),
         "room": rng.choice(ROOMS)}
    turns = [
        _say(rng, ["Do you have time this week to discuss the {topic}?", "Can we meet to talk about the {topic}?",
                   "I'd like to discuss the {topic} with you. When are you free?"], s),
        _say(rng, ["Sure. Are you free on {busy_day}?", "Of course. How about {busy_day}?"], s),
        _say(rng, ["Sorry, I'm busy on {busy_day}. What about {day} at {time}?",
                   "I can't make it on {busy_day}. Is {day} at {time} OK?"], s),
        _say(rng, ["{day} at {time} works for me.", "That's fine with me."], s),
        _say(rng, ["Where shall we meet?", "Where should we meet?"], s),
        _say(rng, ["Let's meet in {room}.", "How about {room}?"], s),
    ]
    if rng.random() < 0.5:
        turns += [_say(rng, ["Great, see you then.", "OK, see you on {day}."], s), _say(rng, ["See you.", "Bye."], s)]
    summaries = [
        f"#Person1# and #Person2# will meet on {s['day']} at {s['time']} in {s['room']} to discuss the {s['topic']}.",
        f"#Person1# wants to discuss the {s['topic']} with #Person2#. They agree to meet in {s['room']} on "
        f"{s['day']} at {s['time']} because #Person1# is busy on {s['busy_day']}.",
    ]
    return turns, summaries, s


def return_product(rng: random.Random) -> tuple[list[str], list[str], dict[str, str]]:
    s = {"item": rng.choice(DEVICES), "when": rng.choice(WHEN), "fault": rng.choice(FAULTS),
         "outcome": rng.choice(["refund", "exchange"])}
    refund = s["outcome"] == "refund"
    turns = [
        _say(rng, ["Hello, I'd like to return this {item}. I bought it {when}.",
                   "Hi, I bought this {item} here {when}, and I want to return it."], s),
        _say(rng, ["What's wrong with it?", "Is there a problem with it?"], s),
        _say(rng, ["It {fault}.", "I'm afraid it {fault}."], s),
        _say(rng, ["I'm sorry. Would you like a refund or an exchange?",
                   "Sorry about that. Do you want your money back or a new one?"], s),
        _say(rng, ["I'd like a refund, please.", "My money back, please."] if refund else
             ["I'd like to exchange it for a new one.", "A new one, please."], s),
    ]
    if rng.random() < 0.5:
        turns += [_say(rng, ["May I see your receipt?", "Do you have the receipt?"], s),
                  _say(rng, ["Yes, here it is.", "Sure, here you are."], s)]
    turns.append(_say(rng, ["Here is your refund.", "OK, your money has been returned."] if refund else
                      ["Here is your new {item}.", "OK, here is a new one."], s))
    summaries = [
        f"#Person1# returns the {s['item']} bought {s['when']} because it {s['fault']}, and gets "
        f"{'a refund' if refund else 'a new one'}.",
        f"#Person1#'s {s['item']} {s['fault']}, so #Person2# gives #Person1# "
        f"{'the money back' if refund else 'a new ' + s['item']}.",
    ]
    return turns, summaries, s


SCENARIOS: dict[str, Scenario] = {
    "book_table": book_table,
    "buy_item": buy_item,
    "ask_way": ask_way,
    "schedule_meeting": schedule_meeting,
    "return_product": return_product,
}
