"""Generator of the small English training corpus used for the bundled ``tiny-gpt2`` and ``tiny-llama`` models.

All text is produced here from hand-written templates and word lists; no third-party
text is used. Each corpus line is a short, friendly passage: a greeting (often
``"Hi there!!"``), a few lines of small talk, and simple sentences about everyday
things (the weather, food, pets, places, colours, plans). The output is fully
deterministic for a given ``(n_lines, seed)`` pair.

Example::

    >>> from tools.tiny_corpus import generate_corpus
    >>> lines = generate_corpus(3, seed=0)
    >>> len(lines)
    3
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

# fmt: off
NAMES: tuple[str, ...] = (
    "Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Emma", "Leo", "Sara",
    "Jack", "Nora", "Tim", "Lucy", "Dan", "Kate", "Alex", "Rosa", "Paul", "Amy",
    "Mark", "Ella", "Jon", "Grace", "Adam", "Ruby", "Oscar", "Maya", "Hugo", "Zoe",
)
FEELINGS: tuple[str, ...] = (
    "fine", "good", "great", "very well", "happy", "a little tired", "okay",
    "really good", "glad", "busy but happy",
)
PLACES: tuple[str, ...] = (
    "park", "beach", "market", "library", "school", "shop", "garden", "lake",
    "city", "zoo", "farm", "river", "cafe", "station", "museum", "forest",
    "playground", "bakery", "kitchen", "hill", "pool", "village", "harbor", "square",
)
COMPANIONS: tuple[str, ...] = (
    "dog", "cat", "sister", "brother", "friend", "mom", "dad", "family",
    "grandma", "grandpa", "best friend", "little brother",
)
PETS: tuple[str, ...] = (
    "dog", "cat", "bird", "fish", "rabbit", "hamster", "puppy", "kitten", "turtle", "parrot", "pony",
)
PET_ACTIONS: tuple[str, ...] = (
    "likes to sleep in the sun", "runs very fast", "loves to play with a ball",
    "sings every morning", "eats a lot of food", "is very small and cute",
    "likes to sit on my bed", "jumps over the fence", "waits for me at the door",
)
ACTIVITIES: tuple[str, ...] = (
    "played with a ball", "read a book", "ate ice cream", "took a long walk",
    "rode our bikes", "had a picnic", "went swimming", "played a game",
    "watched the birds", "looked at the flowers", "drew some pictures",
    "sang a song", "made a cake", "flew a kite", "built a sand castle",
)
ACTIVITIES_INF: tuple[str, ...] = (
    "play a game", "go for a walk", "read a book", "eat some cake",
    "ride bikes", "watch a movie", "go to the park", "make a cake",
    "draw a picture", "play outside", "go swimming", "visit the zoo",
)
FOODS: tuple[str, ...] = (
    "apples", "bread", "soup", "rice", "pasta", "pizza", "eggs", "cheese",
    "bananas", "cookies", "cake", "salad", "fish", "ice cream", "pancakes",
    "sandwiches", "oranges", "carrots", "potatoes", "noodles", "grapes", "strawberries",
    "tomatoes", "muffins", "yogurt", "peaches", "chicken", "beans", "corn", "pears",
)
MEALS: tuple[str, ...] = ("breakfast", "lunch", "dinner", "a snack")
DRINKS: tuple[str, ...] = ("tea", "milk", "water", "juice", "coffee", "hot chocolate")
COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "black", "brown")
OBJECTS: tuple[str, ...] = (
    "ball", "hat", "book", "bike", "cup", "box", "kite", "car", "bag",
    "chair", "door", "coat", "shoe", "house", "boat", "pen", "umbrella", "blanket",
    "lamp", "scarf", "basket", "pencil", "clock", "window", "jacket", "bottle",
)
WEATHER: tuple[str, ...] = (
    "sunny", "warm", "cold", "rainy", "windy", "cloudy", "nice", "hot", "cool", "snowy",
)
TIMES: tuple[str, ...] = (
    "today", "this morning", "this afternoon", "yesterday", "last night",
    "on Sunday", "after school", "after lunch",
)
FUTURE_TIMES: tuple[str, ...] = ("tomorrow", "tonight", "this weekend", "next week", "later today", "on Saturday")
THINGS_SEEN: tuple[str, ...] = (
    "a big tree", "a small bird", "a red car", "many flowers", "a funny dog",
    "a tall house", "a little boat", "two ducks", "a white cat", "a long train",
    "a bright rainbow", "some children", "a yellow bus", "three sheep", "a friendly horse",
    "a busy street", "a quiet pond", "an old bridge", "a kind baker", "a happy baby",
)
ADJ_GOOD: tuple[str, ...] = ("great", "fun", "nice", "lovely", "wonderful", "good", "really fun")
OPENERS: tuple[str, ...] = (
    "Hi there!!", "Hi there!!", "Hi there!!", "Hi there!", "Hello!", "Hello there!",
    "Hey!", "Hi!", "Good morning!", "Good afternoon!", "Good evening!", "Hey there!!",
    "Hello!!", "Hi!!",
)
QUESTIONS: tuple[str, ...] = (
    "How are you today?", "How are you?", "How is your day?", "How was your day?",
    "What are you doing today?", "It is nice to see you again!", "Do you want to play?",
    "What did you do today?", "Are you having a good day?", "How have you been?",
)
CLOSERS: tuple[str, ...] = (
    "See you later!", "Have a nice day!", "Bye for now!", "See you tomorrow!",
    "Take care!", "Have a good night!", "Talk to you soon!", "Goodbye!",
)
# fmt: on


def _answer(rng: random.Random) -> str:
    templates: list[Callable[[], str]] = [
        lambda: f"I am {rng.choice(FEELINGS)}, thank you.",
        lambda: f"I am {rng.choice(FEELINGS)}, thanks for asking.",
        lambda: f"I am {rng.choice(FEELINGS)}. How about you?",
        lambda: f"Thank you, I am {rng.choice(FEELINGS)} today.",
        lambda: f"My day is {rng.choice(ADJ_GOOD)}, thank you.",
    ]
    return rng.choice(templates)()


def _introduce(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    templates = [
        f"My name is {name}.",
        f"I am {name}.",
        f"I am {name}. It is nice to meet you.",
        f"My name is {name}. Nice to meet you!",
    ]
    return rng.choice(templates)


def _everyday(rng: random.Random) -> str:
    templates: list[Callable[[], str]] = [
        lambda: f"{rng.choice(TIMES).capitalize()} I went to the {rng.choice(PLACES)} with my {rng.choice(COMPANIONS)}.",
        lambda: f"We {rng.choice(ACTIVITIES)} and had a {rng.choice(('great', 'fun', 'nice', 'lovely'))} time.",
        lambda: f"We {rng.choice(ACTIVITIES)} at the {rng.choice(PLACES)}.",
        lambda: f"The weather is {rng.choice(WEATHER)} {rng.choice(('today', 'this morning', 'right now'))}.",
        lambda: f"It was {rng.choice(WEATHER)} {rng.choice(TIMES)}, so we stayed {rng.choice(('inside', 'outside', 'at home'))}.",
        lambda: f"I like to eat {rng.choice(FOODS)} for {rng.choice(MEALS)}.",
        lambda: f"For {rng.choice(MEALS)} we had {rng.choice(FOODS)} and {rng.choice(FOODS)}.",
        lambda: f"I drink a cup of {rng.choice(DRINKS)} every morning.",
        lambda: f"My favorite color is {rng.choice(COLORS)}.",
        lambda: f"{rng.choice(NAMES)} has a {rng.choice(COLORS)} {rng.choice(OBJECTS)}.",
        lambda: f"I have a {rng.choice(COLORS)} {rng.choice(OBJECTS)} and a {rng.choice(COLORS)} {rng.choice(OBJECTS)}.",
        lambda: f"My {rng.choice(PETS)} {rng.choice(PET_ACTIONS)}.",
        lambda: f"At the {rng.choice(PLACES)} we saw {rng.choice(THINGS_SEEN)}.",
        lambda: f"I saw {rng.choice(THINGS_SEEN)} on the way to the {rng.choice(PLACES)}.",
        lambda: f"{rng.choice(FUTURE_TIMES).capitalize()} we will go to the {rng.choice(PLACES)}.",
        lambda: f"Do you want to {rng.choice(ACTIVITIES_INF)} with me {rng.choice(FUTURE_TIMES)}?",
        lambda: f"Yes, I would love to {rng.choice(ACTIVITIES_INF)}!",
        lambda: f"That sounds {rng.choice(ADJ_GOOD)}!",
        lambda: f"It was a {rng.choice(ADJ_GOOD)} day.",
        lambda: "I am so happy to see you.",
        lambda: f"Thank you for the {rng.choice(FOODS)}. It was very good.",
        lambda: f"Let us {rng.choice(ACTIVITIES_INF)} together.",
        lambda: f"I like your {rng.choice(COLORS)} {rng.choice(OBJECTS)}. Thank you, it is new!",
        lambda: f"Where are you going? I am going to the {rng.choice(PLACES)}.",
        lambda: f"What is your favorite food? I love {rng.choice(FOODS)}.",
        lambda: f"Can you help me find my {rng.choice(OBJECTS)}? Of course, let us look together.",
        lambda: f"The {rng.choice(OBJECTS)} is on the table next to the {rng.choice(OBJECTS)}.",
        lambda: f"My {rng.choice(COMPANIONS)} and I like to {rng.choice(ACTIVITIES_INF)} {rng.choice(FUTURE_TIMES)}.",
        lambda: f"In the morning I wake up, wash my face and eat {rng.choice(FOODS)}.",
        lambda: f"It is {rng.choice(WEATHER)} outside, so I will take my {rng.choice(('umbrella', 'coat', 'hat', 'scarf', 'jacket'))}.",
    ]
    return rng.choice(templates)()


def _passage(rng: random.Random) -> str:
    parts: list[str] = []
    kind = rng.random()
    if kind < 0.75:
        parts.append(rng.choice(OPENERS))
        if rng.random() < 0.35:
            parts.append(_introduce(rng))
        if rng.random() < 0.7:
            parts.append(rng.choice(QUESTIONS))
            if rng.random() < 0.6:
                parts.append(_answer(rng))
    n_body = rng.randint(2, 5)
    parts.extend(_everyday(rng) for _ in range(n_body))
    if rng.random() < 0.4:
        parts.append(rng.choice(CLOSERS))
    return " ".join(parts)


def generate_corpus(n_lines: int, seed: int) -> list[str]:
    """Return ``n_lines`` short English passages, deterministic for the given ``seed``."""
    if n_lines < 0:
        raise ValueError(f"n_lines must be >= 0, got {n_lines}")
    rng = random.Random(seed)
    return [_passage(rng) for _ in range(n_lines)]


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for line in generate_corpus(args.lines, args.seed):
        print(line)


if __name__ == "__main__":
    _main()
