"""The rules of the ObjectStyles benchmark, in one place: its domains, the class tables that map each
source's own folders and Unicode subgroups to classes, the photograph test's threshold, and the
storage settings. The builder (`objectstyles`) applies them; the README writer describes them."""

from __future__ import annotations

NAME = "ObjectStyles"
DOMAINS: tuple[str, ...] = ("clipart", "lineart", "photo", "render3d")  # sorted: environments 0..3
DEFAULT_RESOLUTION = 128
MIN_PER_CLASS = 6  # fewer images of a class in any domain: the class is dropped everywhere
JPEG_QUALITY = 90  # every domain stored alike; 8 MB in all at 128 px (1,794 images)
FORMAT_VERSION = 3  # 2: several vendors per emoji domain, files `<code point>.<vendor>.jpg`;
# 3: near-duplicates renamed into one object, `<group>.<stem>.jpg` (`objectstyles_dedup`)
# `files_sha256` of a default build (128 px, MIN_PER_CLASS) from the pinned packages with
# requirements.txt's Pillow / resvg-py / fonts: the builder refuses any other result.
EXPECTED_FILES_SHA256 = "7cd12cb9c87fdcbbcb10fd77191f2f11d5f97512030ac7c3fe6c6473909e50ed"
# A photograph's neighbouring pixels are almost never exactly equal (sensor noise, texture);
# a drawing's flat fills make most of them equal. Measured on tuxpaint's `cartoon/` folders
# (drawings by the package's own label): 95% of them have >= 0.2 equal neighbours; the animal
# photographs mostly < 0.05. 0.1 sits between.
PHOTO_MAX_EQUAL_NEIGHBOURS = 0.10

# Source categories -> classes. Folder prefixes (longest match wins; None excludes).
TUXPAINT_FOLDERS: dict[str, str | None] = {
    "animals/mammals": "mammal", "animals/marsupials": "mammal", "animals/mammals/aquatic": "sea_animal",
    "animals/birds": "bird", "animals/fish": "sea_animal", "animals/shellfish": "sea_animal",
    "animals/insects": "insect", "food/fruit": "fruit", "food/vegetables": "vegetable",
    "plants": "plant", "hobbies/music": "musical_instrument", "household/tools": "tool",
    "sports": "sport", "vehicles": "vehicle", "military/vehicles": "vehicle",
}
TUXPAINT_EXCLUDED_FOLDERS = ("cartoon", "toys")  # drawings and toy photographs, by the package's labels
OPENCLIPART_FOLDERS: dict[str, str | None] = {
    "animals/mammals": "mammal", "animals/birds": "bird", "animals/fish": "sea_animal",
    "animals/bugs": "insect", "food/fruit": "fruit", "food/vegetables": "vegetable", "plants": "plant",
    "transportation/vehicles": "vehicle", "transportation/boating": "vehicle",
    "recreation/music": "musical_instrument", "recreation/sports": "sport",
    "tools": "tool", "tools/weapons": None, "tools/toys": None,
}
EMOJI_SUBGROUPS: dict[str, str] = {
    "animal-mammal": "mammal", "animal-bird": "bird", "animal-marine": "sea_animal", "animal-bug": "insect",
    "food-marine": "sea_animal",
    "food-fruit": "fruit", "food-vegetable": "vegetable", "plant-flower": "plant", "plant-other": "plant",
    "transport-ground": "vehicle", "transport-water": "vehicle", "transport-air": "vehicle",
    "musical-instrument": "musical_instrument", "tool": "tool", "sport": "sport",
}
CANDIDATE_CLASSES: tuple[str, ...] = tuple(sorted(set(EMOJI_SUBGROUPS.values())))
EMOJI_DOMAINS = ("lineart", "render3d")
# The vendors pooled in each emoji domain (keys of `_emoji_drawers`), in file-name order.
EMOJI_VENDORS: dict[str, tuple[str, ...]] = {"lineart": ("emojione", "fluenthc", "noto"),
                                              "render3d": ("fluent3d", "notocolor", "twemoji")}
SVG_SCALE = 2  # SVGs are drawn at twice the output size, then fitted like every other image
