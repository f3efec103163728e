"""CHAIR (Caption Hallucination Assessment with Image Relevance; Rohrbach, Hendricks et al., EMNLP 2018).

Pure Python apart from ``nltk`` (optional extra ``chair``), which is imported lazily. Both variants reproduce the
original scripts' numbers exactly on OPERA's released caption logs and hand-made cases (``tests/test_scorers_chair.py``).

Variants (``variant=``)
-----------------------
``opera`` (default; alias ``wordnet``) -- shikiw/OPERA ``chair.py`` @61426ef (HALC's ``eval/chair.py`` and lmms-eval's
    ``coco_cap_chair`` use the same rules): ``nltk.word_tokenize(caption.lower())``, ``nltk.pos_tag`` (averaged
    perceptron), tag -> WordNet POS (J* adj, V* verb, N* noun, R* adv, anything else noun), ``WordNetLemmatizer``.
``original`` (alias ``pattern``) -- LisaAnne/Hallucination ``utils/chair.py`` @6e4d33c as ported to Python 3 by
    Maxlinn/CHAIR-metric-standalone @640c507: the same tokenizer, then ``pattern.en.singularize`` on every token.
    :func:`singularize` below is our own re-implementation of pattern's rule tables (no ``pattern`` dependency),
    quirks included ("bus" -> "bu", "glass" -> "glas", "ties" -> "ty", "tennis" -> "tenni").
``synthetic`` -- for the synthetic scenes of :mod:`vtoolkit.data.scenes` (the reference model's benchmarks), no NLTK
    data needed: lower-case, a regex tokenizer (words, numbers and every punctuation mark as tokens, like
    ``word_tokenize`` on such captions), no lemmatisation (the synonym table lists singular and plural forms), no
    double words; the default synonym table is :data:`vtoolkit.data.scenes.SYNONYMS`. Not comparable with the COCO
    variants: it exists so that CHAIR on the synthetic benchmark runs on a fresh machine.

``caption_to_words`` (both variants), after lemmatising/singularising:
  1. greedy left-to-right merge of two-token phrases found in the double-word table ``D`` (26 identity phrases such
     as "hot dog", "teddy bear", "train track"; "baby X"/"adult X" -> X for 12 animal words; "passenger jet"/"passenger
     train" -> jet/train; "bow tie" -> tie, "toilet seat" -> toilet, "wine glas" -> wine glass). The result is the
     caption's *raw words*; their count (punctuation included) feeds ``Len``;
  2. if both "toilet" and "seat" are raw words, every "seat" is dropped;
  3. the *mentions* are the raw words that are in the synonym list (with repeats), each mapped to its node word (the
     COCO category name heading its synonym line).

Metrics over captions k = 1..K, mentions M_k (node words, with repeats), ground-truth set G_k,
hallucinations H_k = [m in M_k : m not in G_k]:
  - ``CHAIRs = #{k : |H_k| > 0} / K``                 (caption level)
  - ``CHAIRi = sum_k |H_k| / sum_k |M_k|``              (mention level)
  - ``Recall = sum_k |set(M_k) & G_k| / sum_k |G_k|``   (Maxlinn/OPERA, micro-averaged)
  - ``Len = 0.01 * sum_k |raw words_k| / K``            (OPERA's convention: every metric is printed x100, so the
    printed Len is the mean token count); ``avg_len`` holds the plain mean.
  Per caption: CHAIRs_k = 1[|H_k| > 0], CHAIRi_k = |H_k|/|M_k| (0 without mentions), Recall_k = |set(M_k) & G_k|/|G_k|
  (0 for an empty GT), n_words = |raw words_k|.

Division by zero: with ``zero_division=None``/``"raise"`` (default) a zero denominator (no captions, no mentions
at all, or an empty total GT) raises ZeroDivisionError, as both originals do; ``zero_division="zero"`` reports 0.

Ground truth: GT(img) = {node word of every COCO instance annotation's category} | {node words of the mentions in
each of the image's reference captions}, over COCO 2014 train+val, built with the *same* variant. Use
:func:`build_gt_from_coco` (instances_*2014.json + captions_*2014.json) or load a prebuilt ``{image_id: [objects]}``
file (``.json`` or ``.json.gz``, e.g. the GT :func:`build_gt_from_coco` returns, saved once as JSON)
with :func:`load_gt`, optionally overlaid with a per-image diff (``..._maxlinn_pattern_diff.json`` gives the GT of the
``original`` variant). Unlike the originals (a ``defaultdict``: unknown ids silently get an empty GT), an image id
missing from the GT raises KeyError unless ``unknown_image="empty"``.

NLTK data (offline): ``punkt_tab`` and ``averaged_perceptron_tagger_eng`` and ``wordnet`` (NLTK >= 3.9; the
``original`` variant needs only ``punkt_tab``; the ``synthetic`` variant none). Point ``NLTK_DATA`` at a folder
holding them; a missing resource raises :class:`ChairResourceError` naming the ``nltk.download(...)``
calls. NLTK 3.10.1 changed one apostrophe rule of ``word_tokenize``; with ``nltk_compat="3.9"`` (default) we
tokenize with the NLTK 3.9.1-3.10.0 rule whatever NLTK is installed, so Len matches the fixtures (and OPERA's
published numbers) exactly; ``nltk_compat="installed"`` uses the installed ``nltk.word_tokenize`` unchanged (Len of
a few captions with stray apostrophes then differs; mentions never did on the fixtures).

Synonym list: ``SYNONYMS_TXT`` is ``data/synonyms.txt`` of LisaAnne/Hallucination @6e4d33c (Rohrbach, Hendricks,
Burns, Darrell, Saenko, "Object Hallucination in Image Captioning", EMNLP 2018; BSD 2-Clause per that repository's
README), verbatim, quirks included: the entries " motor bike" and " cheesecake" keep their leading space (never
matched), "iPhone" never matches lower-cased text, "televison" is misspelled. Parsing is ``line.strip().split(', ')``
and the first item of a line is its node word. Custom vocabularies: pass ``synonyms=`` (a path, the text, or a list
of lists whose first item is the node word) and/or ``double_words=`` to :class:`CHAIR`.
"""
from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vtoolkit.eval.scorers._io import PathLike, first_key, read_json_any, read_json_records

__all__ = [
    "CHAIR",
    "CHAIR_VARIANTS",
    "SYNONYMS_TXT",
    "CaptionWords",
    "ChairResourceError",
    "ChairResult",
    "build_gt_from_coco",
    "default_double_words",
    "load_captions",
    "load_gt",
    "parse_synonyms",
    "score_chair",
    "score_chair_files",
    "singularize",
]

Variant = Literal["opera", "original", "wordnet", "pattern", "synthetic"]
CHAIR_VARIANTS: tuple = ("opera", "original", "synthetic")
_VARIANT_ALIASES = {"opera": "opera", "wordnet": "opera", "opera_wordnet": "opera", "original": "original",
                    "pattern": "original", "maxlinn": "original", "maxlinn_pattern": "original",
                    "synthetic": "synthetic"}
_REGEX_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")

SYNONYMS_TXT = (
    'person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, '
    'worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, '
    'female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, '
    'skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, '
    'trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, '
    'bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager\n'
    'bicycle, bike, bicycle, bike, unicycle, minibike, trike\n'
    'car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi\n'
    'motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped\n'
    'airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane\n'
    'bus, minibus, trolley\n'
    'train, locomotive, tramway, caboose\n'
    'truck, pickup, lorry, hauler, firetruck\n'
    'boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, '
    'catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, '
    'barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, '
    'steamship\n'
    'traffic light, street light, traffic signal, stop light, streetlight, stoplight\n'
    'fire hydrant, hydrant\n'
    'stop sign\n'
    'parking meter\n'
    'bench, pew\n'
    'bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, '
    'hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, '
    'woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, '
    'flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, '
    'turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, '
    'macaw, peafowl, cockatoo, songbird\n'
    'cat, kitten, feline, tabby\n'
    'dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, '
    'terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, '
    'corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky\n'
    'horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, '
    'bronco\n'
    'sheep, lamb, ram, lamb, goat, ewe\n'
    'cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison \n'
    'elephant\n'
    'bear, panda\n'
    'zebra\n'
    'giraffe\n'
    'backpack, knapsack\n'
    'umbrella\n'
    'handbag, wallet, purse, briefcase\n'
    'tie, bow, bow tie\n'
    'suitcase, suit case, luggage\n'
    'frisbee\n'
    'skis, ski\n'
    'snowboard\n'
    'sports ball, ball\n'
    'kite\n'
    'baseball bat\n'
    'baseball glove\n'
    'skateboard\n'
    'surfboard, longboard, skimboard, shortboard, wakeboard\n'
    'tennis racket, racket\n'
    'bottle\n'
    'wine glass\n'
    'cup\n'
    'fork\n'
    'knife, pocketknife, knive\n'
    'spoon\n'
    'bowl, container\n'
    'banana\n'
    'apple\n'
    'sandwich, burger, sub, cheeseburger, hamburger\n'
    'orange\n'
    'broccoli\n'
    'carrot\n'
    'hot dog\n'
    'pizza\n'
    'donut, doughnut, bagel\n'
    'cake,  cheesecake, cupcake, shortcake, coffeecake, pancake\n'
    'chair, seat, stool\n'
    'couch, sofa, recliner, futon, loveseat, settee, chesterfield \n'
    'potted plant, houseplant\n'
    'bed\n'
    'dining table, table, desk\n'
    'toilet, urinal, commode, toilet, lavatory, potty\n'
    'tv, monitor, televison, television\n'
    'laptop, computer, notebook, netbook, lenovo, macbook, laptop computer\n'
    'mouse\n'
    'remote\n'
    'keyboard\n'
    'cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone\n'
    'microwave\n'
    'oven, stovetop, stove, stove top oven\n'
    'toaster\n'
    'sink\n'
    'refrigerator, fridge, fridge, freezer\n'
    'book\n'
    'clock\n'
    'vase\n'
    'scissors\n'
    'teddy bear, teddybear\n'
    'hair drier, hairdryer\n'
    'toothbrush\n'
)


def parse_synonyms(synonyms: str | PathLike | Sequence[Sequence[str]] | None = None) -> list[list[str]]:
    """Parse a synonym list: each line ``node, syn1, syn2, ...`` (split on ``", "`` after ``strip()``).

    ``None`` gives the built-in COCO list. A ``Path`` (or an existing file name) is read; a string with a newline is
    parsed as the text itself; a sequence of sequences is taken as already parsed (first item = node word).
    """
    if synonyms is None:
        synonyms = SYNONYMS_TXT
    if isinstance(synonyms, Path) or (isinstance(synonyms, str) and "\n" not in synonyms and os.path.exists(synonyms)):
        synonyms = Path(synonyms).read_text(encoding="utf-8")
    if isinstance(synonyms, str):
        # like the originals: every line (blank ones included) is split; a blank line gives the harmless '' entry
        rows = [line.strip().split(", ") for line in synonyms.splitlines()]
    else:
        rows = [list(r) for r in synonyms]
    rows = [r for r in rows if r and r != [""]]
    if not rows:
        raise ValueError("empty synonym list")
    return rows


_DOUBLE_IDENTITY = ("motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
                    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
                    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
                    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
                    "stove top oven", "home plate", "train track")
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLES = ("jet", "train")


def default_double_words() -> dict[str, str]:
    """The COCO double-word table ``D`` of the originals (55 entries), ``{"w1 w2": replacement}``."""
    d = {w: w for w in _DOUBLE_IDENTITY}
    for a in _ANIMALS:
        d[f"baby {a}"] = a
        d[f"adult {a}"] = a
    for v in _VEHICLES:
        d[f"passenger {v}"] = v
    d["bow tie"] = "tie"
    d["toilet seat"] = "toilet"
    d["wine glas"] = "wine glass"  # because pattern singularises "glass" to "glas"
    return d


# ------------------------------------------------------------------------------------------------ singularize
# A re-implementation of ``pattern.en.singularize`` (clips/pattern, pattern/text/en/inflect.py; BSD; its singular
# rules are adapted there from Bermi Ferrer's Inflector, MIT-style). The checks run in this order, first hit wins:
#   compound "x-<preposition>-..." -> singularize(x) + rest;  trailing "'" -> singularize(word[:-1]) + "'s";
#   a word that is a *suffix* of an uninflected/uncountable word is returned unchanged (so "ears" stays "ears" because
#   of "shears", "a" stays "a" because of "tuna"); "-ie" diminutives (cookies) are returned unchanged;
#   irregular endings ("men" -> "man", "people" -> "person", "leaves" -> "leaf", and the quirky "our" -> "my");
#   then the ordered suffix rules below (note "([m|l])ice" is a character class, so "slice" -> "slouse", and
#   "([octop|vir])i" likewise); finally a bare trailing "s" is dropped ("bus" -> "bu", "glass" -> "glas").
_PREPOSITIONS = frozenset(
    ["about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across", "below", "for", "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside", "in", "out", "unto", "around", "besides", "into", "over", "upon", "at", "between", "near", "since", "with", "athwart", "betwixt", "beyond", "but", "by"])
_UNCHANGED_SUFFIX_OF = (
    # uninflected
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks proceedings "
    "whiting britches eland homework rabies wildebeest carp elk innings salmon chassis flounder jackanapes scissors "
    "christmas gallows mackerel series clippers georgia measles shears cod graffiti mews species contretemps mumps "
    "swine corps news swiss "
    # uncountable
    "advice equipment happiness luggage software bread fruit information mathematics progress understanding butter "
    "furniture ketchup mayonnaise research water cheese garbage knowledge meat rice electricity gravel love mustard "
    "sand").split()
# pattern lists "^pie" and "^tie" here too; written with a literal "^" they can never match, which is why "ties"
# becomes "ty". They are omitted: the behaviour is identical.
_IE_DIMINUTIVES = tuple(x + "s" for x in ["alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie", "nightie", "sortie", "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie", "freebie", "junkie", "sweetie", "zombie", "bogie", "goonie", "laddie", "pixie", "techie", "bombie", "groupie", "laramie", "quickie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie", "hippie", "meanie", "rookie", "valkyrie"])
_IRREGULAR_ENDINGS = tuple(tuple(p.split(":")) for p in (  # checked in this (alphabetical) order
    "atlantes:atlas atlases:atlas axes:axe beeves:beef brethren:brother children:child corpora:corpus "
    "corpuses:corpus ephemerides:ephemeris feet:foot ganglia:ganglion geese:goose genera:genus genii:genie "
    "graffiti:graffito helves:helve kine:cow leaves:leaf loaves:loaf men:man mongooses:mongoose monies:money "
    "moves:move mythoi:mythos numena:numen occipita:occiput octopodes:octopus opera:opus opuses:opus our:my "
    "oxen:ox penes:penis penises:penis people:person sexes:sex soliloquies:soliloquy teeth:tooth testes:testis "
    "trilbys:trilby turves:turf zoa:zoon").split())
_I = re.IGNORECASE
_SUFFIX_RULES = tuple((re.compile(p, f), r) for p, r, f in (
    (r"(.)ae$", r"\1a", _I),
    (r"(.)itis$", r"\1itis", _I),
    (r"(.)eaux$", r"\1eau", _I),
    (r"(quiz)zes$", r"\1", _I),
    (r"(matr)ices$", r"\1ix", _I),
    (r"(ap|vert|ind)ices$", r"\1ex", _I),
    (r"^(ox)en", r"\1", _I),
    (r"(alias|status)es$", r"\1", _I),
    (r"([octop|vir])i$", r"\1us", _I),
    (r"(cris|ax|test)es$", r"\1is", _I),
    (r"(shoe)s$", r"\1", _I),
    (r"(o)es$", r"\1", _I),
    (r"(bus)es$", r"\1", _I),
    (r"([m|l])ice$", r"\1ouse", _I),
    (r"(x|ch|ss|sh)es$", r"\1", _I),
    (r"(m)ovies$", r"\1ovie", _I),
    (r"(.)ombies$", r"\1ombie", _I),
    (r"(s)eries$", r"\1eries", _I),
    (r"([^aeiouy]|qu)ies$", r"\1y", _I),
    (r"([aeo]l)ves$", r"\1f", 0),
    (r"([^d]ea)ves$", r"\1f", 0),
    (r"arves$", "arf", 0),
    (r"erves$", "erve", 0),
    (r"([nlw]i)ves$", r"\1fe", 0),
    (r"([lr])ves$", r"\1f", _I),
    (r"([aeo])ves$", r"\1ve", 0),
    (r"(sive)s$", r"\1", _I),
    (r"(tive)s$", r"\1", _I),
    (r"(hive)s$", r"\1", _I),
    (r"([^f])ves$", r"\1fe", _I),
    (r"(^analy)ses$", r"\1sis", _I),
    (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis", _I),
    (r"(.)opses$", r"\1opsis", _I),
    (r"(.)yses$", r"\1ysis", _I),
    (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose", _I),
    (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose", _I),
    (r"(.)oses$", r"\1osis", _I),
    (r"([ti])a$", r"\1um", _I),
    (r"(n)ews$", r"\1ews", _I),
    (r"s$", "", _I),
))


@functools.lru_cache(maxsize=200_000)
def singularize(word: str) -> str:
    """Singular of an English (lower-case) word with ``pattern.en.singularize``'s rules, e.g. "dogs" -> "dog",
    "people" -> "person", "buses" -> "bus", and its quirks ("bus" -> "bu", "glass" -> "glas", "ties" -> "ty")."""
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    for x in _UNCHANGED_SUFFIX_OF:
        if x.endswith(w):
            return word
    if w.endswith(_IE_DIMINUTIVES):
        return w
    for plural, single in _IRREGULAR_ENDINGS:
        if w.endswith(plural):
            return word[: len(word) - len(plural)] + single
    for rx, repl in _SUFFIX_RULES:
        if rx.search(word):
            return rx.sub(repl, word)  # unmatched groups expand to "" (Python >= 3.5), as pattern arranges by hand
    return word


# ------------------------------------------------------------------------------------------------ NLTK backend
class ChairResourceError(LookupError):
    """NLTK (or one of its data packages) needed by the CHAIR scorer is missing."""


def _nltk_resource_names() -> dict[str, tuple[str, str]]:
    """{role: (nltk.data.find path, nltk.download name)} for the installed NLTK version."""
    import nltk

    try:
        major, minor = (int(x) for x in nltk.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover
        major, minor = 3, 9
    if (major, minor) >= (3, 9):
        return {"punkt": ("tokenizers/punkt_tab/english/", "punkt_tab"),
                "tagger": ("taggers/averaged_perceptron_tagger_eng/", "averaged_perceptron_tagger_eng"),
                "wordnet": ("corpora/wordnet/", "wordnet")}
    return {"punkt": ("tokenizers/punkt/english.pickle", "punkt"),  # pragma: no cover - old NLTK
            "tagger": ("taggers/averaged_perceptron_tagger/", "averaged_perceptron_tagger"),
            "wordnet": ("corpora/wordnet/", "wordnet")}


def _import_nltk():
    try:
        import nltk
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ChairResourceError("the CHAIR scorer needs NLTK: pip install 'vtoolkit[chair]' (or pip install "
                                 "'nltk>=3.9.1')") from e
    # NLTK reads NLTK_DATA once, at import; honour a value set later (e.g. by a test fixture)
    for p in reversed([p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]):
        if p not in nltk.data.path:
            nltk.data.path.insert(0, p)
    return nltk


def _check_resources(roles: Sequence[str]) -> None:
    nltk = _import_nltk()
    names = _nltk_resource_names()
    missing = []
    for role in roles:
        path, name = names[role]
        try:
            nltk.data.find(path)
        except LookupError:
            missing.append(name)
    if missing:
        calls = "; ".join(f"nltk.download({n!r})" for n in missing)
        raise ChairResourceError(
            f"CHAIR needs the NLTK data package(s) {missing}, which were not found on the NLTK data path "
            f"{list(nltk.data.path)[:4]}... Either set NLTK_DATA to a folder that holds them (an offline copy, made on a "
            f"machine with network access by: python -m nltk.downloader -d DIR {' '.join(missing)}) or run once with "
            f"network access: python -c \"import nltk; {calls}\"")


class _NltkBackend:
    """Loads the punkt sentence splitter, the word tokenizer, the perceptron tagger and WordNet once, and caches the
    per-token lemmatisation (``nltk.pos_tag`` would otherwise rebuild the tagger on every call)."""

    def __init__(self, compat: str, need_tagger: bool):
        nltk = _import_nltk()
        _check_resources(["punkt", "tagger", "wordnet"] if need_tagger else ["punkt"])
        from nltk.tokenize import sent_tokenize
        from nltk.tokenize.destructive import NLTKWordTokenizer

        self._sent_tokenize = sent_tokenize
        if compat == "3.9":
            # The apostrophe rule of NLTK 3.9.1-3.10.0 (3.10.1 replaced it); everything else is the installed
            # tokenizer. This keeps tokens (hence Len) identical to the fixtures whatever NLTK >= 3.9 is installed.
            class _Tok(NLTKWordTokenizer):
                STARTING_QUOTES = list(NLTKWordTokenizer.STARTING_QUOTES[:-1]) + [
                    (re.compile(r"(?i)(\')(?!re|ve|ll|m|t|s|d|n)(\w)\b", re.UNICODE), r"\1 \2")]

            self._word_tok = _Tok()
        elif compat == "installed":
            self._word_tok = None
            self._word_tokenize = nltk.word_tokenize
        else:
            raise ValueError("nltk_compat must be '3.9' or 'installed'")
        self._tagger = None
        if need_tagger:
            self._load_tagger()

    def _load_tagger(self):
        if "tagger" not in _SHARED:  # the tagger, WordNet and the lemma cache do not depend on the tokenizer mode
            from nltk.corpus import wordnet
            from nltk.stem import WordNetLemmatizer
            from nltk.tag.perceptron import PerceptronTagger

            wnl = WordNetLemmatizer()
            wnl.lemmatize("dogs", "n")  # force the lazy WordNet load now
            _SHARED.update(tagger=_FastPerceptron(PerceptronTagger()), wnl=wnl, lemma_cache={},
                           pos={"J": wordnet.ADJ, "V": wordnet.VERB, "N": wordnet.NOUN, "R": wordnet.ADV})
        self._tagger = _SHARED["tagger"]
        self._wnl = _SHARED["wnl"]
        self._pos = _SHARED["pos"]
        self._lemma_cache = _SHARED["lemma_cache"]

    @functools.lru_cache(maxsize=100_000)  # noqa: B019 - backends are process-wide singletons
    def tokenize(self, text: str) -> tuple[str, ...]:
        """``nltk.word_tokenize(text)`` (punkt sentence split, then the NLTK word tokenizer per sentence)."""
        if self._word_tok is None:
            return tuple(self._word_tokenize(text))
        return tuple(tok for sent in self._sent_tokenize(text) for tok in self._word_tok.tokenize(sent))

    def lemmatize_tagged(self, tokens: Sequence[str]) -> list[str]:
        """``WordNetLemmatizer().lemmatize(tok, pos)`` with the POS from ``nltk.pos_tag(tokens)`` (OPERA)."""
        if self._tagger is None:
            self._load_tagger()
        out = []
        cache = self._lemma_cache
        for tok, tag in self._tagger.tag(list(tokens)):
            pos = self._pos.get(tag[:1], "n")
            key = (tok, pos)
            lemma = cache.get(key)
            if lemma is None:
                lemma = cache[key] = self._wnl.lemmatize(tok, pos=pos)
            out.append(lemma)
        return out


class _FastPerceptron:
    """``PerceptronTagger.tag`` with the same features, tag dictionary and float arithmetic, but scores accumulated in
    dense per-feature numpy rows instead of per-label dict updates (about 3x faster on captions).

    Exactness: NLTK adds ``value * weight`` to ``scores[label]`` feature by feature in the features' insertion order;
    here the same products are added in the same order, labels absent from a feature add ``0.0`` (``x + 0.0 == x``),
    and ties are broken like NLTK's ``max(classes, key=(score, label))`` (the largest label among the best scores).
    ``tests/test_scorers_chair.py`` checks tag-for-tag equality with NLTK's own tagger.
    """

    def __init__(self, tagger):
        import numpy as np

        self._np = np
        self.nltk_tagger = tagger
        self._weights = tagger.model.weights
        self._classes = sorted(tagger.model.classes)
        self._index = {c: i for i, c in enumerate(self._classes)}
        self._rows: dict[str, object] = {}
        self._tagdict = tagger.tagdict

    def _row(self, feat):
        row = self._rows.get(feat)
        if row is None:
            w = self._weights.get(feat)
            if w is None:
                self._rows[feat] = row = False
            else:
                row = self._np.zeros(len(self._classes))
                for label, weight in w.items():
                    row[self._index[label]] = weight
                self._rows[feat] = row
        return row

    def predict(self, features) -> str:
        np = self._np
        acc = np.zeros(len(self._classes))
        rows = self._rows
        for feat, value in features.items():
            row = rows.get(feat)
            if row is None:
                row = self._row(feat)
            if row is False or value == 0:
                continue
            if value == 1:
                acc += row
            else:
                acc += value * row
        best = np.flatnonzero(acc == acc.max())
        return self._classes[int(best[-1])]

    def tag(self, tokens: Sequence[str]) -> list[tuple[str, str]]:
        t = self.nltk_tagger
        prev, prev2 = t.START
        context = t.START + [t.normalize(w) for w in tokens] + t.END
        out = []
        for i, word in enumerate(tokens):
            tag = self._tagdict.get(word)
            if not tag:
                tag = self.predict(t._get_features(i, word, context, prev, prev2))
            out.append((word, tag))
            prev2 = prev
            prev = tag
        return out


_BACKENDS: dict[tuple[str, bool], _NltkBackend] = {}
_SHARED: dict[str, object] = {}


def _backend(compat: str, need_tagger: bool) -> _NltkBackend:
    key = (compat, need_tagger)
    if key not in _BACKENDS:
        full = _BACKENDS.get((compat, True))
        _BACKENDS[key] = full if full is not None else _NltkBackend(compat, need_tagger)
    return _BACKENDS[key]


# ------------------------------------------------------------------------------------------------ evaluator
@dataclass(frozen=True)
class CaptionWords:
    """``caption_to_words`` output: mentions (synonym words), their node words, their indices in the lemma list,
    and the raw words after the double-word merge (punctuation included; their count is the caption's Len)."""

    words: tuple[str, ...]
    node_words: tuple[str, ...]
    idxs: tuple[int, ...]
    raw_words: tuple[str, ...]


@dataclass
class ChairResult:
    variant: str
    overall: dict
    per_caption: list[dict] = field(repr=False, default_factory=list)

    def to_dict(self, with_captions: bool = False) -> dict:
        d = {"variant": self.variant, "overall": self.overall}
        if with_captions:
            d["per_caption"] = self.per_caption
        return d


def _norm_id(x):
    if isinstance(x, bool):
        raise ValueError(f"invalid image id {x!r}")
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, str):
        s = x.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        m = re.fullmatch(r"(?:COCO_(?:val|train)2014_)?0*(\d+)(?:\.jpg)?", s)
        if m:
            return int(m.group(1))
        return s
    raise ValueError(f"invalid image id {x!r}")


class CHAIR:
    """A CHAIR evaluator for one tokenizer ``variant`` ("opera" = NLTK WordNet lemmas, "original" = pattern
    singularize) and one object vocabulary. See the module docstring for the algorithm and formulas.

    >>> ev = CHAIR("opera")                                            # doctest: +SKIP
    >>> res = ev.compute([(1, "A man walks a dog.")], {1: {"person"}})  # doctest: +SKIP
    >>> res.overall["CHAIRs"], res.overall["CHAIRi"]                    # doctest: +SKIP
    (1.0, 0.5)
    """

    def __init__(self, variant: Variant = "opera", *, synonyms=None, double_words: Mapping[str, str] | None = None,
                 nltk_compat: Literal["3.9", "installed"] = "3.9"):
        if variant not in _VARIANT_ALIASES:
            raise ValueError(f"unknown CHAIR variant {variant!r}; choose 'opera' (NLTK WordNet, OPERA/HALC/lmms-eval), "
                             f"'original' (pattern singularize, Rohrbach et al. / Maxlinn) or 'synthetic' (regex "
                             f"tokens, the synthetic scenes' vocabulary, no NLTK)")
        self.variant = _VARIANT_ALIASES[variant]
        self.nltk_compat = nltk_compat
        if self.variant == "synthetic":
            from vtoolkit.data.scenes import SYNONYMS

            synonyms = SYNONYMS if synonyms is None else synonyms
            double_words = {} if double_words is None else double_words
        rows = parse_synonyms(synonyms)
        self.synonym_rows = rows
        self.objects: frozenset[str] = frozenset(s for r in rows for s in r)
        self.inverse: dict[str, str] = {s: r[0] for r in rows for s in r}
        self.node_words: tuple[str, ...] = tuple(dict.fromkeys(r[0] for r in rows))
        self.double_words: dict[str, str] = dict(default_double_words() if double_words is None else double_words)
        self._nltk = None if self.variant == "synthetic" else _backend(nltk_compat, self.variant == "opera")

    # -- words
    def lemmas(self, caption: str) -> list[str]:
        """Lower-case, tokenize, then lemmatise (opera) or singularise (original) every token; ``synthetic``: the
        regex tokens unchanged."""
        if self.variant == "synthetic":
            return _REGEX_TOKEN.findall(caption.lower())
        tokens = self._nltk.tokenize(caption.lower())
        if self.variant == "opera":
            return self._nltk.lemmatize_tagged(tokens)
        return [singularize(t) for t in tokens]

    def caption_to_words(self, caption: str) -> CaptionWords:
        words = self.lemmas(caption)
        raw, idxs = [], []
        dw = self.double_words
        i, n = 0, len(words)
        while i < n:
            idxs.append(i)
            pair = words[i] + " " + words[i + 1] if i + 1 < n else words[i]
            if pair in dw:
                raw.append(dw[pair])
                i += 2
            else:
                raw.append(words[i])
                i += 1
        kept = raw
        if "toilet" in raw and "seat" in raw:
            kept = [w for w in raw if w != "seat"]
        objs = self.objects
        # the originals index the pre-removal list with positions of the post-removal one; kept for fidelity
        m_idx = tuple(idxs[j] for j, w in enumerate(kept) if w in objs)
        mentions = tuple(w for w in kept if w in objs)
        return CaptionWords(mentions, tuple(self.inverse[w] for w in mentions), m_idx, tuple(raw))

    # -- scoring
    def compute(self, captions: Iterable, gt: Mapping, *, unknown_image: Literal["error", "empty"] = "error",
                zero_division: Literal["raise", "zero"] | None = None) -> ChairResult:
        """Score ``captions`` (an iterable of ``(image_id, caption)`` pairs or ``{"image_id", "caption"}`` dicts)
        against ``gt`` (``{image_id: iterable of node words}``)."""
        if zero_division not in (None, "raise", "zero"):
            raise ValueError("zero_division must be None, 'raise' or 'zero'")
        gt_sets = gt if _is_normalised_gt(gt) else {_norm_id(k): frozenset(v) for k, v in gt.items()}
        n_caps = n_hall_caps = n_mentions = n_hall = n_tokens = n_gt = n_recalled = 0
        per = []
        for item in captions:
            if isinstance(item, Mapping):
                imid, cap = item["image_id"], item["caption"]
            else:
                imid, cap = item
            if cap is None:
                cap = ""
            if not isinstance(cap, str):
                raise ValueError(f"caption of image {imid!r} is not a string: {cap!r}")
            key = _norm_id(imid)
            if key in gt_sets:
                g = gt_sets[key]
            elif unknown_image == "empty":
                g = frozenset()
            else:
                raise KeyError(f"CHAIR: image id {imid!r} is not in the ground truth ({len(gt_sets)} images). Use the "
                               f"COCO 2014 train+val GT, or pass unknown_image='empty' to treat it as an image "
                               f"without objects (what the original scripts silently do)")
            cw = self.caption_to_words(cap)
            hallucinated = [(w, nw) for w, nw in zip(cw.words, cw.node_words) if nw not in g]
            hall_idxs = [ix for w, nw, ix in zip(cw.words, cw.node_words, cw.idxs) if nw not in g]
            recalled = {nw for nw in cw.node_words if nw in g}
            n_caps += 1
            n_mentions += len(cw.node_words)
            n_hall += len(hallucinated)
            n_hall_caps += bool(hallucinated)
            n_tokens += len(cw.raw_words)
            n_gt += len(g)
            n_recalled += len(recalled)
            per.append({
                "image_id": imid,
                "caption": cap,
                "words": list(cw.raw_words),
                "mentions": list(cw.words),
                "generated_node_words": list(cw.node_words),
                "hallucinated": [list(h) for h in hallucinated],
                "hallucination_idxs": hall_idxs,
                "gt_objects": sorted(g),
                "CHAIRs": int(bool(hallucinated)),
                "CHAIRi": len(hallucinated) / float(len(cw.words)) if cw.words else 0.0,
                "Recall": len(recalled) / len(g) if g else 0.0,
                "n_words": len(cw.raw_words),
            })
        guarded = zero_division == "zero"

        def div(num, den, what):
            if den == 0:
                if guarded:
                    return 0.0
                raise ZeroDivisionError(f"CHAIR {what} is undefined: its denominator is 0 (the original scripts raise "
                                        f"here too). Pass zero_division='zero' to report 0.")
            return num / den

        fc = float(n_caps)
        overall = {
            "CHAIRs": div(float(n_hall_caps), fc, "CHAIRs (no captions)"),
            "CHAIRi": div(float(n_hall), float(n_mentions), "CHAIRi (no object mentions in any caption)"),
            "Recall": div(float(n_recalled), float(n_gt), "Recall (empty ground truth for every image)"),
            "Len": div(0.01 * n_tokens, fc, "Len (no captions)"),
            "avg_len": div(float(n_tokens), fc, "Len (no captions)"),
            "n_captions": n_caps,
            "n_hallucinated_captions": n_hall_caps,
            "n_mentions": n_mentions,
            "n_hallucinated_mentions": n_hall,
            "n_gt_objects": n_gt,
            "n_recalled_gt_objects": n_recalled,
            "n_tokens": n_tokens,
        }
        # lmms-eval-style keys (coco_cap_chair reports x100)
        overall["coco_cap_chair_s"] = overall["CHAIRs"] * 100
        overall["coco_cap_chair_i"] = overall["CHAIRi"] * 100
        overall["coco_cap_recall"] = overall["Recall"] * 100
        return ChairResult(variant=self.variant, overall=overall, per_caption=per)

    # -- ground truth
    def gt_from_coco(self, instances: Sequence[Mapping], categories: Sequence[Mapping],
                     captions: Sequence[Mapping]) -> dict:
        """GT sets from COCO annotation lists (see :func:`build_gt_from_coco`)."""
        id_to_name = {c["id"]: c["name"] for c in categories}
        objs: dict = {}
        for ann in instances:
            name = id_to_name[ann["category_id"]]
            if name not in self.inverse:
                raise KeyError(f"COCO category {name!r} is not in the synonym list; add it to the vocabulary")
            objs.setdefault(_norm_id(ann["image_id"]), set()).add(self.inverse[name])
        for ann in captions:
            objs.setdefault(_norm_id(ann["image_id"]), set()).update(self.caption_to_words(ann["caption"]).node_words)
        return {k: frozenset(v) for k, v in objs.items()}


class _GT(dict):
    """A dict {normalised image id: frozenset} (marker type: already normalised)."""


def _is_normalised_gt(gt) -> bool:
    return isinstance(gt, _GT)


# ------------------------------------------------------------------------------------------------ loaders
def _gt_mapping_from_json(data, where: str) -> dict:
    if isinstance(data, Mapping):
        if "imid_to_objects" in data and isinstance(data["imid_to_objects"], Mapping):
            data = data["imid_to_objects"]
        out = {}
        for k, v in data.items():
            if not isinstance(v, (list, tuple, set)):
                raise ValueError(f"{where}: expected {{image_id: [objects]}}, got {type(v).__name__} for key {k!r}")
            out[_norm_id(k)] = frozenset(v)
        return out
    if isinstance(data, list):  # [{"image_id": .., "objects"/"gt_objects"/"gt_object": [...]}]
        out = {}
        for i, r in enumerate(data, 1):
            _, imid = first_key(r, ("image_id", "question_id", "id"), "image id", f"{where}: record {i}")
            _, objs = first_key(r, ("objects", "gt_objects", "gt_object", "mscoco_gt_words"), "objects",
                                f"{where}: record {i}")
            out[_norm_id(imid)] = frozenset(objs)
        return out
    raise ValueError(f"{where}: unrecognised ground-truth format")


def load_gt(path: PathLike, overlay: PathLike | None = None) -> dict:
    """Load a prebuilt ground truth ``{image_id: [node words]}`` (``.json`` or ``.json.gz``; a list of records with
    ``image_id`` + ``objects``/``gt_objects``/``gt_object`` also works). ``overlay`` (same formats) replaces the sets
    of the images it lists, e.g. the pattern-variant diff."""
    gt = _GT(_gt_mapping_from_json(read_json_any(path), str(path)))
    if overlay is not None:
        gt.update(_gt_mapping_from_json(read_json_any(overlay), str(overlay)))
    if not gt:
        raise ValueError(f"{path}: empty ground truth")
    return gt


def build_gt_from_coco(annotations: PathLike | Sequence[PathLike], evaluator: CHAIR | None = None,
                       variant: Variant = "opera") -> dict:
    """Build the CHAIR ground truth from COCO annotation files.

    ``annotations`` is a directory holding ``instances_{train,val}2014.json`` and ``captions_{train,val}2014.json``
    (both splits are used when present, as in the originals; at least one split is required), or an explicit list of
    instance/caption JSON files (told apart by their content). Tokenising ~600k reference captions takes minutes.
    """
    ev = evaluator or CHAIR(variant)
    if isinstance(annotations, (str, Path)) and Path(annotations).is_dir():
        d = Path(annotations)
        files = [d / f"{kind}_{split}2014.json" for kind in ("instances", "captions") for split in ("train", "val")]
        files = [f for f in files if f.exists()]
        if not any(f.name.startswith("instances") for f in files) or not any(
                f.name.startswith("captions") for f in files):
            raise FileNotFoundError(f"{d}: need instances_{{train,val}}2014.json and captions_{{train,val}}2014.json "
                                    f"(COCO 2014 annotations_trainval2014.zip)")
    else:
        files = [Path(annotations)] if isinstance(annotations, (str, Path)) else [Path(f) for f in annotations]
    instances, categories, captions = [], [], []
    for f in files:
        data = read_json_any(f)
        if "categories" in data:
            instances.extend(data.get("annotations", []))
            if not categories:
                categories = data["categories"]
        else:
            captions.extend(data.get("annotations", []))
    return _GT(ev.gt_from_coco(instances, categories, captions))


def load_captions(path: PathLike, image_id_key: str = "image_id", caption_key: str = "caption") -> list[tuple]:
    """Load generated captions as ``[(image_id, caption), ...]``.

    Accepts JSON Lines or a JSON array of ``{image_id, caption}`` objects (OPERA's released logs, HALC, Maxlinn);
    the original's self-critical format ``{"imgToEval": {id: {"image_id", "caption"}}}``; and a saved CHAIR output
    ``{"sentences": [...]}``. Other key names via ``image_id_key`` / ``caption_key`` (``question_id`` and
    ``text``/``answer``/``prediction`` are tried as fall-backs).
    """
    p = Path(path)
    recs = read_json_records(p)
    if len(recs) == 1 and isinstance(recs[0], Mapping) and (
            "imgToEval" in recs[0] or "sentences" in recs[0]):
        obj = recs[0]
        recs = list(obj["imgToEval"].values()) if "imgToEval" in obj else list(obj["sentences"])
    out = []
    id_keys = (image_id_key, "image_id", "question_id", "image")
    cap_keys = (caption_key, "caption", "text", "answer", "prediction")
    for i, r in enumerate(recs, 1):
        _, imid = first_key(r, id_keys, "image id", f"{p}: record {i}")
        _, cap = first_key(r, cap_keys, "caption", f"{p}: record {i}")
        out.append((imid, cap))
    if not out:
        raise ValueError(f"{p}: no captions found")
    return out


def score_chair(captions: Iterable, gt: Mapping, variant: Variant = "opera", **kwargs) -> ChairResult:
    """One-shot scoring: ``CHAIR(variant).compute(captions, gt)``. ``kwargs`` go to :meth:`CHAIR.compute`, except
    ``synonyms``, ``double_words`` and ``nltk_compat`` which go to :class:`CHAIR`."""
    ctor = {k: kwargs.pop(k) for k in ("synonyms", "double_words", "nltk_compat") if k in kwargs}
    return CHAIR(variant, **ctor).compute(captions, gt, **kwargs)


def score_chair_files(captions: PathLike, gt: PathLike, variant: Variant = "opera", *,
                      gt_overlay: PathLike | None = None, image_id_key: str = "image_id",
                      caption_key: str = "caption", **kwargs) -> ChairResult:
    """Score a captions file against a prebuilt GT file (see :func:`load_captions`, :func:`load_gt`)."""
    return score_chair(load_captions(captions, image_id_key, caption_key), load_gt(gt, gt_overlay), variant, **kwargs)


def _fmt_pct(v: float) -> str:  # pragma: no cover - tiny helper used by the CLI
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:.1f}"
