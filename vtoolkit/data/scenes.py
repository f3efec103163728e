"""Procedural scenes: coloured shapes on textured backgrounds, with exact annotations, captions and questions.

A scene is a pure function of ``(seed, index)`` (``numpy.random.default_rng([seed, index])``): the same pair gives
the same objects, colours, sizes, positions and background on every machine, and rendering adds no randomness of its
own. Training and benchmarks draw from different seeds (:data:`TRAIN_SEED`, :data:`BENCH_SEED`), so benchmark scenes
are held out. Rendering (supersampled 4x, then box-filtered) runs at several hundred scenes per second.

Vocabulary
----------
- 10 object classes (:data:`CLASSES`), drawn as flat icons: circle, square, triangle, star, heart, cross (a plus
  sign), ring, diamond, moon (a crescent), arrow. Each is rotated by at most 12 degrees, so a square never becomes a
  diamond.
- 6 colours (:data:`COLORS`); every instance of a class in one scene has the same colour (so "two red stars" is
  well defined). 1-3 instances per class, 1-4 classes and at most 6 instances per scene, radius 6-10 px on the
  64 px canvas, never overlapping.
- 6 backgrounds (:data:`BACKGROUNDS`): plain, noisy, striped, checkered, dotted, shaded; muted colours (saturation
  <= 0.3, value 0.22-0.55) so that the saturated objects stand out.

Statistics that give a language prior (the source of hallucinations)
--------------------------------------------------------------------
- Frequencies: the first classes are drawn with the weights :data:`FREQUENCY` (circle most, arrow least), so
  POPE's "popular" negatives are the classes a model says "yes" to most readily.
- Co-occurrence: :data:`PAIRS` (moon-star, cross-ring, heart-diamond, square-triangle). When one class of a pair is
  drawn, its partner is added with probability :data:`P_PARTNER` (0.8) while the scene has room, so captions that
  mention a moon usually mention a star, and POPE's "adversarial" negatives are the absent partners.

Language
--------
:func:`caption` names every object group left to right ("Two red stars, a blue moon and an orange ring on a striped
background."); the CHAIR vocabulary is :data:`SYNONYMS` (singular and plural of each class plus a few synonyms).
:func:`training_turns` writes question/answer turns in the harness's prompt formats (POPE, MME, captions; see
:mod:`vtoolkit.eval.protocol`); :mod:`vtoolkit.data.synthetic` writes the benchmarks.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUNDS", "BENCH_SEED", "CANVAS", "CAPTION_PROMPTS", "CLASSES", "COLORS", "FREQUENCY", "MME_SUFFIX",
    "OPPOSITE", "PAIRS", "PARTNER", "P_PARTNER", "SHORT_ANSWER", "SYNONYMS", "TRAIN_SEED", "Scene", "SceneObject",
    "caption", "count_question", "count_word", "describe", "description", "groups", "groups_left_to_right",
    "hard_negatives", "make_scene", "negative_class",
    "noun", "object_mask", "patch_coverage", "position_question", "render", "scenes", "training_turns",
    "with_article",
]

CANVAS = 64          # scene coordinates are in pixels of a CANVAS x CANVAS image; render(size=...) rescales
TRAIN_SEED = 0       # training scenes: make_scene(TRAIN_SEED, i)
BENCH_SEED = 20_251  # held-out benchmark scenes (vtoolkit.data.synthetic); never used for training

CLASSES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond", "moon", "arrow")
FREQUENCY = {"circle": 3.0, "square": 2.5, "star": 2.0, "triangle": 2.0, "heart": 1.5, "ring": 1.5, "cross": 1.0,
             "diamond": 1.0, "moon": 1.0, "arrow": 0.8}
PAIRS = (("moon", "star"), ("cross", "ring"), ("heart", "diamond"), ("square", "triangle"))
PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
P_PARTNER = 0.8
COLORS = {"red": (215, 45, 45), "orange": (240, 135, 25), "yellow": (235, 215, 45), "green": (45, 170, 70),
          "blue": (45, 95, 225), "purple": (145, 65, 200)}
BACKGROUNDS = ("plain", "noisy", "striped", "checkered", "dotted", "shaded")
PLURALS = {c: c + ("es" if c.endswith(("s", "x", "ch", "sh")) else "s") for c in CLASSES}
# CHAIR synonym table of the synthetic vocabulary: the first word of a row is the node word (a class name).
SYNONYMS = (
    ("circle", "circles", "disc", "discs", "disk", "disks"),
    ("square", "squares"),
    ("triangle", "triangles"),
    ("star", "stars"),
    ("heart", "hearts"),
    ("cross", "crosses", "plus", "pluses"),
    ("ring", "rings", "hoop", "hoops"),
    ("diamond", "diamonds", "rhombus", "rhombi", "rhombuses"),
    ("moon", "moons", "crescent", "crescents"),
    ("arrow", "arrows"),
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."   # = vtoolkit.eval.protocol.LLAVA_SHORT_ANSWER
MME_SUFFIX = " Please answer yes or no."                                 # = vtoolkit.eval.protocol.MME_SUFFIX

_N_CLASSES_P = (0.3, 0.35, 0.25, 0.1)   # first draw: 1..4 classes (partners may add more, up to MAX_CLASSES)
_COUNT_P = (0.6, 0.28, 0.12)            # instances per class: 1, 2, 3
MAX_CLASSES = 4
MAX_INSTANCES = 6
_RADIUS = (6.0, 10.0)
_MAX_ANGLE = 12.0


@dataclass(frozen=True)
class SceneObject:
    """One instance: class, colour name, jittered RGB, centre (x, y) and radius in canvas pixels, rotation (deg)."""

    cls: str
    color: str
    rgb: tuple[int, int, int]
    x: float
    y: float
    r: float
    angle: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """COCO-style ``[x, y, w, h]`` of the circle the shape is drawn in."""
        return (self.x - self.r, self.y - self.r, 2 * self.r, 2 * self.r)


@dataclass(frozen=True)
class Scene:
    """A procedural scene. ``classes`` lists the object classes present, in annotation order (POPE's ground-truth
    object list); ``objects`` the instances."""

    seed: int
    index: int
    background: str
    bg_rgb: tuple[int, int, int]
    bg_rgb2: tuple[int, int, int]
    bg_period: int
    bg_orientation: int
    classes: tuple[str, ...]
    objects: tuple[SceneObject, ...]

    @property
    def name(self) -> str:
        return f"scene_{self.seed}_{self.index:06d}"

    def count(self, cls: str) -> int:
        return sum(o.cls == cls for o in self.objects)

    def color_of(self, cls: str) -> str | None:
        return next((o.color for o in self.objects if o.cls == cls), None)

    def instances(self, cls: str) -> list[SceneObject]:
        return [o for o in self.objects if o.cls == cls]

    def side(self, cls: str, axis: str, margin: float = 0.12) -> str | None:
        """Where the class's only instance is along ``axis`` ("x": left/right, "y": top/bottom), or None when the
        class has several instances or its centre is within ``margin`` (fraction of the canvas) of the middle."""
        inst = self.instances(cls)
        if len(inst) != 1:
            return None
        v = (inst[0].x if axis == "x" else inst[0].y) / CANVAS - 0.5
        if abs(v) < margin:
            return None
        if axis == "x":
            return "left" if v < 0 else "right"
        return "top" if v < 0 else "bottom"


# ------------------------------------------------------------------------------------------------ sampling
def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _draw_classes(rng: np.random.Generator) -> list[str]:
    n = int(rng.choice(4, p=_N_CLASSES_P)) + 1
    w = np.array([FREQUENCY[c] for c in CLASSES])
    first = [CLASSES[i] for i in rng.choice(len(CLASSES), size=n, replace=False, p=w / w.sum())]
    classes = list(first)
    for c in first:
        partner = PARTNER.get(c)
        if partner and partner not in classes and len(classes) < MAX_CLASSES and rng.random() < P_PARTNER:
            classes.append(partner)
    return [classes[i] for i in rng.permutation(len(classes))]


def _place(rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float, float] | None]:
    """Non-overlapping centres for the given radii (largest first); a radius shrinks by 1 px after 100 failed tries,
    and an instance that cannot be placed at the minimum radius gets None."""
    placed: list[tuple[float, float, float]] = []
    out: list[tuple[float, float, float] | None] = [None] * len(radii)
    for i in sorted(range(len(radii)), key=lambda k: -radii[k]):
        r = radii[i]
        while r >= _RADIUS[0] - 1e-9 and out[i] is None:
            for _ in range(100):
                x, y = rng.uniform(r + 1, CANVAS - r - 1, size=2)
                if all(math.hypot(x - px, y - py) >= r + pr + 2 for px, py, pr in placed):
                    out[i] = (float(x), float(y), float(r))
                    placed.append(out[i])
                    break
            else:
                r -= 1.0
    return out


def make_scene(seed: int, index: int, min_classes: int = 1) -> Scene:
    """The scene ``index`` of the stream ``seed``; with ``min_classes`` > 1 the class draw is repeated (from the
    same stream, so still deterministic) until the scene has at least that many classes."""
    rng = np.random.default_rng([int(seed), int(index)])
    while True:
        classes = _draw_classes(rng)
        if len(classes) >= min_classes:
            break
    counts = [int(rng.choice(3, p=_COUNT_P)) + 1 for _ in classes]
    while sum(counts) > MAX_INSTANCES:
        counts[int(np.argmax(counts))] -= 1
    colors = [list(COLORS)[int(rng.integers(len(COLORS)))] for _ in classes]
    rgbs = [tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLORS[c]) for c in colors]
    plan = [(k, c) for k, c in enumerate(classes) for _ in range(counts[k])]
    radii = [float(rng.uniform(*_RADIUS)) for _ in plan]
    angles = [float(rng.uniform(-_MAX_ANGLE, _MAX_ANGLE)) for _ in plan]
    spots = _place(rng, radii)
    objects = tuple(SceneObject(cls=c, color=colors[k], rgb=rgbs[k], x=s[0], y=s[1], r=s[2], angle=a)
                    for (k, c), s, a in zip(plan, spots, angles) if s is not None)
    present = {o.cls for o in objects}
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    h = float(rng.random())
    s = float(rng.uniform(0.0, 0.3))
    v = float(rng.uniform(0.22, 0.55))
    bg_rgb = _hsv_to_rgb(h, s, v)
    bg_rgb2 = _hsv_to_rgb((h + rng.uniform(-0.15, 0.15)) % 1.0, s, float(np.clip(v + rng.choice([-1, 1]) * 0.1, 0, 1)))
    return Scene(seed=int(seed), index=int(index), background=bg, bg_rgb=bg_rgb, bg_rgb2=bg_rgb2,
                 bg_period=int(rng.integers(3, 7)), bg_orientation=int(rng.integers(3)),
                 classes=tuple(c for c in classes if c in present), objects=objects)


def scenes(seed: int, start: int = 0, stop: int | None = None, min_classes: int = 1):
    """Iterate over ``make_scene(seed, i)`` for ``i`` in ``range(start, stop)`` (endless without ``stop``)."""
    i = start
    while stop is None or i < stop:
        yield make_scene(seed, i, min_classes)
        i += 1


# ------------------------------------------------------------------------------------------------ rendering
def _background(scene: Scene, size: int) -> np.ndarray:
    """The background as a ``size x size x 3`` float array (0-255); texture scale follows the canvas."""
    s = size / CANVAS
    base = np.array(scene.bg_rgb, dtype=np.float32)
    alt = np.array(scene.bg_rgb2, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / s
    period = scene.bg_period * 2
    kind = scene.background
    noise_rng = np.random.default_rng([scene.seed, scene.index, 7])
    if kind == "plain":
        t = np.zeros((size, size), np.float32)
    elif kind == "noisy":
        t = noise_rng.random((CANVAS, CANVAS), dtype=np.float32)
        t = np.kron(t, np.ones((max(1, size // CANVAS),) * 2, np.float32))[:size, :size] if size != CANVAS else t
    elif kind == "striped":
        coord = (xx, yy, xx + yy)[scene.bg_orientation]
        t = ((coord // (period / 2)) % 2).astype(np.float32)
    elif kind == "checkered":
        t = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    elif kind == "dotted":
        t = (((xx % period) < 2) & ((yy % period) < 2)).astype(np.float32)   # 2 x 2 px dots
    else:  # shaded: a linear gradient along the orientation
        coord = (xx, yy, (xx + yy) / 2)[scene.bg_orientation]
        t = coord / CANVAS
    return base[None, None, :] * (1 - t[..., None]) + alt[None, None, :] * t[..., None]


def _polygon(cls: str, r: float) -> list[tuple[float, float]]:
    """Outline of a class's icon around (0, 0) for radius ``r`` (y grows downwards)."""
    if cls == "square":
        a = r * 0.82
        return [(-a, -a), (a, -a), (a, a), (-a, a)]
    if cls == "triangle":
        return [(r * math.cos(math.radians(t)), r * math.sin(math.radians(t)) + 0.15 * r) for t in (-90, 30, 150)]
    if cls == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            t = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(t), rad * math.sin(t) + 0.08 * r))
        return pts
    if cls == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, (y + 2.5) * r / 17))
        return pts
    if cls == "cross":
        a, b = r, r * 0.32
        return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
                (-b, -b)]
    if cls == "diamond":
        return [(0, -r), (r * 0.68, 0), (0, r), (-r * 0.68, 0)]
    if cls == "arrow":
        sh, hw = r * 0.22, r * 0.62
        return [(-r, -sh), (r * 0.1, -sh), (r * 0.1, -hw), (r, 0), (r * 0.1, hw), (r * 0.1, sh), (-r, sh)]
    raise ValueError(cls)


def _draw_mask(draw, cls: str, cx: float, cy: float, r: float, angle: float) -> None:
    """Draw the icon of ``cls`` in white on an "L" mask (ImageDraw ``draw``) in its own pixel coordinates."""
    if cls in ("circle", "ring", "moon"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if cls == "ring":
            q = r * 0.52
            draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
        elif cls == "moon":
            t = math.radians(angle - 35)
            ox, oy = cx + 0.55 * r * math.cos(t), cy + 0.55 * r * math.sin(t)
            q = r * 0.85
            draw.ellipse([ox - q, oy - q, ox + q, oy + q], fill=0)
        return
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in _polygon(cls, r)], fill=255)


def object_mask(scene: Scene, obj: SceneObject, size: int = CANVAS, supersample: int = 4) -> np.ndarray:
    """Coverage of ``obj`` in ``[0, 1]`` per pixel of a ``size x size`` rendering (what :func:`render` blends)."""
    from PIL import Image, ImageDraw

    big = size * supersample
    k = big / CANVAS
    mask = Image.new("L", (big, big), 0)
    _draw_mask(ImageDraw.Draw(mask), obj.cls, obj.x * k, obj.y * k, obj.r * k, obj.angle)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def patch_coverage(scene: Scene, grid: int) -> np.ndarray:
    """Per patch of a ``grid x grid`` split of the canvas (raster order), the fraction covered by an object."""
    cover = np.zeros((CANVAS, CANVAS), np.float32)
    for o in scene.objects:
        cover = np.maximum(cover, object_mask(scene, o))
    p = CANVAS // grid
    return cover.reshape(grid, p, grid, p).mean((1, 3)).reshape(-1)


def render(scene: Scene, size: int = CANVAS, supersample: int = 4):
    """The scene as an RGB ``PIL.Image`` of ``size x size`` pixels (objects anti-aliased by supersampling)."""
    from PIL import Image, ImageDraw

    big = size * supersample
    k = big / CANVAS
    img = Image.fromarray(np.clip(_background(scene, size) + 0.5, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((big, big), Image.NEAREST)
    for o in scene.objects:
        r = o.r * k
        pad = int(r) + 3
        x0, y0 = int(o.x * k) - pad, int(o.y * k) - pad
        mask = Image.new("L", (2 * pad, 2 * pad), 0)
        _draw_mask(ImageDraw.Draw(mask), o.cls, o.x * k - x0, o.y * k - y0, r, o.angle)
        img.paste(o.rgb, (x0, y0, x0 + 2 * pad, y0 + 2 * pad), mask)
    return img.resize((size, size), Image.BOX)


# ------------------------------------------------------------------------------------------------ language
def noun(cls: str, n: int = 1) -> str:
    return cls if n == 1 else PLURALS[cls]


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def count_word(n: int) -> str:
    return NUMBER_WORDS[n]


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def groups_left_to_right(scene: Scene) -> list[str]:
    """The classes present, ordered by their leftmost instance."""
    return sorted(scene.classes, key=lambda c: min(o.x for o in scene.instances(c)))


def groups(scene: Scene) -> list[tuple[int, str, str]]:
    """``(count, colour, class)`` of every object group, left to right."""
    return [(scene.count(c), scene.color_of(c), c) for c in groups_left_to_right(scene)]


def describe(items: Sequence[tuple[int, str, str]], colors: bool = True) -> str:
    """"Two red stars, a blue moon and an orange ring." for ``[(2, "red", "star"), (1, "blue", "moon"), ...]``
    ("Two stars, a moon and a ring." without ``colors``)."""
    parts = []
    for n, color, cls in items:
        phrase = f"{color} {noun(cls, n)}" if colors else noun(cls, n)
        parts.append(with_article(phrase) if n == 1 else f"{count_word(n)} {phrase}")
    text = _join(parts) if parts else "nothing"
    return text[0].upper() + text[1:] + "."


def description(scene: Scene, colors: bool = True) -> str:
    """The objects, left to right, with count and colour (:func:`describe` of :func:`groups`): the text side of the
    ViT's contrastive pretraining, which therefore learns nothing about the background."""
    return describe(groups(scene), colors)


def hard_negatives(scene: Scene, rng: np.random.Generator, colors: bool = True) -> list[str]:
    """Two descriptions that are wrong about ``scene`` in one detail (NegCLIP-style hard negatives): one group's
    class replaced by an absent class; and two groups' colours swapped (or, with a single colour, one count
    changed; always the count without ``colors``). Colours and counts are easy to see; these negatives make the
    contrastive task need the shapes."""
    items = groups(scene)
    k = int(rng.integers(len(items)))
    absent = [c for c in CLASSES if c not in scene.classes]
    n, col, _ = items[k]
    shape = items[:k] + [(n, col, absent[int(rng.integers(len(absent)))])] + items[k + 1:]
    pairs = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items)) if items[i][1] != items[j][1]]
    if pairs and colors:
        i, j = pairs[int(rng.integers(len(pairs)))]
        other = list(items)
        other[i], other[j] = (items[i][0], items[j][1], items[i][2]), (items[j][0], items[i][1], items[j][2])
    else:
        other = list(items)
        m = other[k][0]
        other[k] = (1 + (m % 3), other[k][1], other[k][2])
    return [describe(shape, colors), describe(other, colors)]


def caption(scene: Scene) -> str:
    """The reference caption: :func:`description` plus the background ("... on a striped background.")."""
    return f"{description(scene)[:-1]} on a {scene.background} background."


CAPTION_PROMPTS = ("Please describe this image in detail.", "Describe this image.",
                   "Generate a short caption of this image.", "What is in this image?")


@functools.cache
def _popularity_order() -> tuple[str, ...]:
    return tuple(sorted(CLASSES, key=lambda c: -FREQUENCY[c]))


def negative_class(scene: Scene, rng: np.random.Generator, strategy: str, avoid: Sequence[str] = ()) -> str | None:
    """An absent class chosen like POPE's negatives: ``random`` (uniform), ``popular`` (the most frequent absent
    class), ``adversarial`` (the absent partner of a present class; else random)."""
    absent = [c for c in CLASSES if c not in scene.classes and c not in avoid]
    if not absent:
        return None
    if strategy == "popular":
        return next(c for c in _popularity_order() if c in absent)
    if strategy == "adversarial":
        partners = [PARTNER[c] for c in scene.classes if PARTNER.get(c) in absent]
        if partners:
            return partners[int(rng.integers(len(partners)))]
    return absent[int(rng.integers(len(absent)))]


def _yes_no(flag: bool) -> str:
    return "Yes" if flag else "No"


def _short(q: str, rng: np.random.Generator, mme: bool) -> str:
    """The harness's short-answer suffix (both POPE and MME protocols use it), or MME's raw suffix sometimes."""
    if mme and rng.random() < 0.25:
        return q + MME_SUFFIX
    return q + SHORT_ANSWER


def _existence(scene, rng):
    mme = rng.random() < 0.3
    where = "this image" if mme else "the image"
    if rng.random() < 0.5:
        c, ans = scene.classes[int(rng.integers(len(scene.classes)))], True
    else:
        c = negative_class(scene, rng, ("random", "popular", "adversarial")[int(rng.integers(3))])
        ans = False
    return _short(f"Is there {with_article(c)} in {where}?", rng, mme), _yes_no(ans)


def _color_yn(scene, rng):
    c = scene.classes[int(rng.integers(len(scene.classes)))]
    true = scene.color_of(c)
    col = true if rng.random() < 0.5 else [k for k in COLORS if k != true][int(rng.integers(len(COLORS) - 1))]
    return _short(f"Is there {with_article(col + ' ' + c)} in this image?", rng, True), _yes_no(col == true)


def _color_open(scene, rng):
    c = scene.classes[int(rng.integers(len(scene.classes)))]
    return f"What color is the {c}?" + SHORT_ANSWER, scene.color_of(c).capitalize()


def count_question(c: str, n: int) -> str:
    return f"Is there only one {c} in this image?" if n == 1 else f"Are there {count_word(n)} {noun(c, n)} in this image?"


def _count_yn(scene, rng):
    c = scene.classes[int(rng.integers(len(scene.classes)))]
    true = scene.count(c)
    n = true if rng.random() < 0.5 else [k for k in (1, 2, 3, 4) if k != true][int(rng.integers(3))]
    return _short(count_question(c, n), rng, True), _yes_no(n == true)


def _count_open(scene, rng):
    c = scene.classes[int(rng.integers(len(scene.classes)))]
    return f"How many {noun(c, 2)} are there in the image?" + SHORT_ANSWER, count_word(scene.count(c)).capitalize()


def position_question(c: str, side: str) -> str:
    if side in ("left", "right"):
        return f"Is the {c} on the {side} side of this image?"
    return f"Is the {c} at the {side} of this image?"


OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def _position_yn(scene, rng):
    options = [(c, axis, scene.side(c, axis)) for c in scene.classes for axis in ("x", "y")]
    options = [o for o in options if o[2] is not None]
    if not options:
        return None
    c, _, side = options[int(rng.integers(len(options)))]
    ask = side if rng.random() < 0.5 else OPPOSITE[side]
    return _short(position_question(c, ask), rng, True), _yes_no(ask == side)


def _caption_turn(scene, rng):
    k = 0 if rng.random() < 0.7 else int(rng.integers(1, len(CAPTION_PROMPTS)))
    return CAPTION_PROMPTS[k], caption(scene)


_TURNS = ((_existence, 0.38), (_color_yn, 0.15), (_count_yn, 0.15), (_position_yn, 0.16), (_count_open, 0.09),
          (_color_open, 0.07))


def training_turns(scene: Scene, rng: np.random.Generator, n: int = 6, caption: bool = False) -> list[tuple[str, str]]:
    """``n`` (question, answer) turns about ``scene`` in the harness's prompt formats: POPE/MME-style yes/no questions
    (existence with random/popular/adversarial negatives, colour, count, position) and open colour/count questions,
    yes/no balanced, no question repeated; or, with ``caption=True``, one caption turn (a conversation never holds
    both, so no answer can be copied from a caption in the context)."""
    if caption:
        return [_caption_turn(scene, rng)]
    fns, w = zip(*_TURNS)
    p = np.array(w) / sum(w)
    out, seen = [], set()
    tries = 0
    while len(out) < n and tries < 10 * n:
        tries += 1
        turn = fns[int(rng.choice(len(fns), p=p))](scene, rng)
        if turn is None or turn[0] in seen:
            continue
        seen.add(turn[0])
        out.append(turn)
    return out
