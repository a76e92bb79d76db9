"""Common English words for synthetic prompts.

Each word is a single token, with and without a leading space, in SmolLM2's byte-level BPE
vocabulary (checked when the list was made) and in most English BPE vocabularies, so that a
prompt of N words is close to N tokens even without a tokenizer (the approximate scheme, see
`tokenizer.WordTokenizer`).
"""

# fmt: off
WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "that", "it", "for", "was", "on", "are", "as", "with",
    "his", "they", "at", "be", "this", "from", "have", "or", "by", "one", "had", "not", "but",
    "what", "all", "were", "when", "we", "there", "can", "an", "your", "which", "their", "said",
    "if", "do", "will", "each", "about", "how", "up", "out", "them", "then", "she", "many",
    "some", "so", "these", "would", "other", "into", "has", "more", "her", "two", "like", "him",
    "see", "time", "could", "no", "make", "than", "first", "been", "its", "who", "now",
    "people", "my", "made", "over", "did", "down", "only", "way", "find", "use", "may", "water",
    "long", "little", "very", "after", "words", "called", "just", "where", "most", "know",
    "get", "through", "back", "much", "go", "good", "new", "write", "our", "me", "man", "too",
    "any", "day", "same", "right", "look", "think", "also", "around", "another", "came", "come",
    "work", "three", "word", "must", "because", "does", "part", "even", "place", "well", "such",
    "here", "take", "why", "things", "help", "put", "years", "different", "away", "again",
    "off", "went", "old", "number", "great", "tell", "men", "say", "small", "every", "found",
    "still", "between", "name", "should", "home", "big", "give", "air", "line", "set", "own",
    "under", "read", "last", "never", "us", "left", "end", "along", "while", "might", "next",
    "sound", "below", "something", "thought", "both", "few", "those", "always", "show", "large",
    "often", "together", "house", "world", "going", "want", "school", "important", "until",
    "form", "food", "keep", "children", "feet", "land", "side", "without", "boy", "once",
    "animals", "life", "enough", "sometimes", "four", "head", "above", "kind", "almost", "live",
    "page", "got", "earth", "need", "far", "hand", "high", "year", "mother", "light", "parts",
    "country", "father", "let", "night", "following", "picture", "being", "study", "second",
    "soon", "times", "story", "boys", "since", "white", "days", "ever", "paper", "hard", "near",
    "sentence", "better", "best", "during", "today", "others", "however", "means", "try",
    "young", "sun", "ways", "thing", "whole", "example", "several", "change", "answer", "room",
    "sea", "against", "top", "learn", "point", "city", "play", "five", "using", "usually",
    "money", "seen", "car", "given", "trees", "family", "open", "river",
)
# fmt: on
